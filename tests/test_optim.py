"""Optimisers, clipping and the schedule against PyTorch's own, in float64.

Tolerance: 1e-12 relative + 1e-14 absolute on parameters after several steps (the two
sides do the same float64 operations, in a slightly different order).
"""
import math

import numpy as np
import pytest
import torch

from tinyvit.training.optim import SGD, AdamW, clip_grad_norm, decays, grad_global_norm, warmup_cosine

RTOL, ATOL = 1e-12, 1e-14
SHAPES = {"cls_token": (1, 1, 4), "pos_embed": (1, 5, 4), "patch_embed.proj.weight": (4, 1, 2, 2),
          "patch_embed.proj.bias": (4,), "blocks.0.norm1.weight": (4,), "blocks.0.attn.qkv.weight": (12, 4),
          "head.weight": (3, 4), "head.bias": (3,)}


def random_params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def grads_at(step, dtype=np.float64):
    rng = np.random.default_rng(100 + step)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def torch_groups(params, weight_decay):
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    decay = [t for k, t in tp.items() if decays(k, t.shape)]
    no_decay = [t for k, t in tp.items() if not decays(k, t.shape)]
    return tp, [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_both(ours, make_torch, lrs, weight_decay):
    params = random_params()
    tp, groups = torch_groups(params, weight_decay)
    topt = make_torch(groups)
    for step, lr in enumerate(lrs):
        g = grads_at(step)
        ours.step(params, g, lr)
        for group in topt.param_groups:
            group["lr"] = lr
        for k, t in tp.items():
            t.grad = torch.tensor(g[k])
        topt.step()
    for k in params:
        np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=k)


def test_no_decay_rule_follows_timm():
    assert [k for k, s in SHAPES.items() if decays(k, s)] == [
        "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"]


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)])
def test_adamw_matches_torch(weight_decay, betas):
    lrs = [1e-3, 3e-3, 2e-3, 5e-4, 1e-4]
    run_both(AdamW(lr=1e-3, betas=betas, eps=1e-8, weight_decay=weight_decay),
             lambda g: torch.optim.AdamW(g, lr=1e-3, betas=betas, eps=1e-8), lrs, weight_decay)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_sgd_matches_torch(momentum, nesterov, weight_decay):
    lrs = [0.1, 0.05, 0.2, 0.01]
    run_both(SGD(lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov),
             lambda g: torch.optim.SGD(g, lr=0.1, momentum=momentum, nesterov=nesterov), lrs, weight_decay)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    g = grads_at(0)
    clipped, norm = clip_grad_norm(g, max_norm)
    tg = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES.values()]
    for t, v in zip(tg, g.values()):
        t.grad = torch.tensor(v)
    tnorm = torch.nn.utils.clip_grad_norm_(tg, max_norm)
    assert abs(float(norm) - float(tnorm)) <= 1e-12 * float(tnorm)
    for (k, v), t in zip(clipped.items(), tg):
        np.testing.assert_allclose(v, t.grad.numpy(), rtol=RTOL, atol=ATOL, err_msg=k)
    assert all(np.array_equal(g[k], grads_at(0)[k]) for k in g), "clipping must not write into the input grads"


def test_clip_keeps_float32():
    g = grads_at(0, np.float32)
    clipped, norm = clip_grad_norm(g, 0.1)
    assert norm.dtype == np.float32 and all(v.dtype == np.float32 for v in clipped.values())


def test_float32_stays_float32():
    params = random_params(dtype=np.float32)
    for opt in (AdamW(lr=1e-3), SGD(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)):
        opt.step(params, grads_at(0, np.float32), 1e-3)
        assert all(v.dtype == np.float32 for v in params.values())
        assert all(v.dtype == np.float32 for slot in opt.state.values() for v in slot.values())


@pytest.mark.parametrize("total,warmup", [(20, 5), (7, 0), (10, 10)])
def test_schedule_matches_lambdalr(total, warmup):
    base = 1e-3
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=base)

    def factor(s):  # the same rule written independently
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for s in range(total):
        assert warmup_cosine(s, total, warmup, base) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-15)
        opt.step()
        sched.step()
    assert warmup_cosine(warmup, total, warmup, base) == pytest.approx(base) or warmup == total


def test_schedule_min_lr_and_bad_args():
    assert warmup_cosine(99, 100, 0, 1.0, 0.1) == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 10, 11, 1.0)


@pytest.mark.parametrize("make,match", [
    (lambda: AdamW(lr=-1e-3), "lr"), (lambda: AdamW(lr=float("nan")), "lr"), (lambda: AdamW(lr=float("inf")), "lr"),
    (lambda: AdamW(betas=(1.0, 0.999)), r"betas\[0\]"), (lambda: AdamW(betas=(0.9, -0.1)), r"betas\[1\]"),
    (lambda: AdamW(betas=(0.9, float("nan"))), r"betas\[1\]"), (lambda: AdamW(weight_decay=-0.1), "weight_decay"),
    (lambda: AdamW(eps=0.0), "eps"), (lambda: SGD(momentum=1.0), "momentum"), (lambda: SGD(lr=-1.0), "lr"),
    (lambda: SGD(momentum=0.0, nesterov=True), "nesterov"), (lambda: SGD(weight_decay=float("nan")), "weight_decay"),
    (lambda: clip_grad_norm(grads_at(0), 0.0), "max_norm"), (lambda: clip_grad_norm(grads_at(0), -1.0), "max_norm"),
    (lambda: clip_grad_norm(grads_at(0), float("nan")), "max_norm"),
])
def test_bad_settings_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_types_raise():
    with pytest.raises(TypeError, match="lr"):
        AdamW(lr="0.1")
    with pytest.raises(TypeError, match="betas"):
        AdamW(betas=0.9)


def test_bad_step_leaves_everything_unchanged():
    opt = AdamW(lr=1e-3)
    params = random_params()
    opt.step(params, grads_at(0))
    before = ({k: v.copy() for k, v in params.items()}, {s: {k: v.copy() for k, v in d.items()}
                                                        for s, d in opt.state.items()}, opt.t)
    g = grads_at(1)
    del g["head.bias"]
    with pytest.raises(ValueError, match="head.bias"):
        opt.step(params, g)
    g = grads_at(1)
    g["head.weight"] = g["head.weight"][:, :2]
    with pytest.raises(ValueError, match="head.weight"):
        opt.step(params, g)
    with pytest.raises(ValueError, match="lr"):
        opt.step(params, grads_at(1), lr=float("nan"))
    assert opt.t == before[2]
    for k in params:
        assert np.array_equal(params[k], before[0][k])
    for s, d in opt.state.items():
        for k in d:
            assert np.array_equal(d[k], before[1][s][k])


def test_state_dict_round_trip_continues_identically():
    a, b = AdamW(lr=1e-3), AdamW(lr=1e-3)
    pa = random_params()
    for s in range(3):
        a.step(pa, grads_at(s))
    arrays, meta = a.state_dict()
    pb = {k: v.copy() for k, v in pa.items()}
    b.load_state_dict(arrays, meta, pb)
    a.step(pa, grads_at(3))
    b.step(pb, grads_at(3))
    for k in pa:
        assert np.array_equal(pa[k], pb[k])


def test_load_state_dict_is_all_or_nothing():
    a = AdamW()
    pa = random_params()
    a.step(pa, grads_at(0))
    arrays, meta = a.state_dict()
    fresh = AdamW()
    bad = dict(arrays)
    bad["exp_avg.head.weight"] = bad["exp_avg.head.weight"][:1]
    bad["exp_avg.nope"] = np.zeros(3)
    with pytest.raises(ValueError) as err:
        fresh.load_state_dict(bad, meta, pa)
    assert "exp_avg.head.weight" in str(err.value) and "exp_avg.nope" in str(err.value)
    assert fresh.t == 0 and fresh.state == {"exp_avg": {}, "exp_avg_sq": {}}
    with pytest.raises(ValueError, match="sgd"):
        SGD().load_state_dict(arrays, meta, pa)


def test_grad_global_norm():
    g = grads_at(0)
    assert float(grad_global_norm(g)) == pytest.approx(math.sqrt(sum(float((v ** 2).sum()) for v in g.values())))
