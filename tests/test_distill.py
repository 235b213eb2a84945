"""DeiT hard distillation: the loss and its backward against PyTorch autograd (timm's
``DistillationLoss`` with ``distillation_type='hard'``), finite differences, and a
distilled model's forward/backward against the PyTorch twin.

Tolerances: 1e-12 absolute (float64, the same operations); finite differences with
step 1e-6, 1e-7 relative.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinyvit import VisionTransformer
from tinyvit.gradcheck import assert_backward
from tinyvit.training.distill import hard_distillation_backward, hard_distillation_forward, teacher_labels
from tests.torch_twin import torch_params, torch_vit_forward


def logits_set(b=6, k=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, k)), rng.standard_normal((b, k)), rng.standard_normal((b, k)) * 3


def torch_hard_distill(cls, dist, targets, teacher, alpha, smoothing):
    """timm's DistillationLoss (hard) with a CrossEntropy base criterion."""
    base = F.cross_entropy(cls, targets, label_smoothing=smoothing)
    distill = F.cross_entropy(dist, teacher.argmax(dim=1))
    return base * (1 - alpha) + distill * alpha


@pytest.mark.parametrize("alpha,smoothing", [(0.5, 0.0), (0.5, 0.1), (0.3, 0.2)])
@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft-targets"])
def test_loss_and_gradients_match_pytorch(alpha, smoothing, soft):
    cls, dist, teacher = logits_set()
    rng = np.random.default_rng(1)
    targets = rng.dirichlet(np.ones(4), 6) if soft else rng.integers(0, 4, 6)
    loss, (cls_loss, dist_loss), cache = hard_distillation_forward(cls, dist, targets, teacher, alpha, smoothing)
    dcls, ddist = hard_distillation_backward(cache)

    tc, td = torch.tensor(cls, requires_grad=True), torch.tensor(dist, requires_grad=True)
    tloss = torch_hard_distill(tc, td, torch.tensor(targets), torch.tensor(teacher), alpha, smoothing)
    tloss.backward()
    assert abs(float(loss) - float(tloss.detach())) < 1e-12
    np.testing.assert_allclose(dcls, tc.grad.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ddist, td.grad.numpy(), rtol=0, atol=1e-12)
    assert float(loss) == pytest.approx((1 - alpha) * float(cls_loss) + alpha * float(dist_loss))


def test_finite_differences():
    """Through tinyvit.gradcheck: every logit of both heads, a random upstream dloss."""
    cls, dist, teacher = logits_set(seed=3)
    y = np.array([0, 1, 2, 3, 0, 1])

    def forward(c, d):
        loss, _, cache = hard_distillation_forward(c, d, y, teacher, 0.5, 0.1)
        return loss, cache

    assert_backward(forward, lambda dloss, cache: hard_distillation_backward(cache, dloss), [cls, dist],
                    names=["cls_logits", "dist_logits"], eps=1e-6, rtol=1e-7, atol=1e-9)


def test_teacher_labels_and_bad_inputs():
    cls, dist, teacher = logits_set()
    assert np.array_equal(teacher_labels(teacher), teacher.argmax(1))
    with pytest.raises(ValueError, match="teacher logits"):
        hard_distillation_forward(cls, dist, np.zeros(6, int), teacher[:, :3])
    with pytest.raises(ValueError, match="alpha"):
        hard_distillation_forward(cls, dist, np.zeros(6, int), teacher, alpha=1.5)
    with pytest.raises(ValueError, match="labels must lie"):
        hard_distillation_forward(cls, dist, np.full(6, 9), teacher)


def test_distilled_student_step_matches_pytorch():
    """The whole student: forward_distill, the distillation loss, backward_distill; vs the twin."""
    m = VisionTransformer(image_size=8, patch_size=4, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=24,
                          channels=1, distilled=True, dtype="float64", seed=2)
    assert "dist_token" in m.params and "head_dist.weight" in m.params  # timm's DeiT keys
    rng = np.random.default_rng(0)
    x, y, teacher = rng.standard_normal((5, 1, 8, 8)), rng.integers(0, 4, 5), rng.standard_normal((5, 4))
    cls, dist = m.forward_distill(x, train=False)
    loss, _, cache = hard_distillation_forward(cls, dist, y, teacher, 0.5, 0.1)
    m.backward_distill(*hard_distillation_backward(cache))

    p = torch_params(m.state_dict())
    tc, td = torch_vit_forward(torch.tensor(x), p, m.config)
    tloss = torch_hard_distill(tc, td, torch.tensor(y), torch.tensor(teacher), 0.5, 0.1)
    tloss.backward()
    assert abs(float(loss) - float(tloss.detach())) < 1e-12
    for k, t in p.items():
        np.testing.assert_allclose(m.grads[k], t.grad.numpy(), rtol=0, atol=1e-10, err_msg=k)
    # inference averages the two heads
    np.testing.assert_allclose(m.forward(x), (tc + td).detach().numpy() / 2, atol=1e-12)
