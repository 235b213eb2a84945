"""Head gates, head importance and head pruning (tinyvit/pruning/).

The gate's gradient against finite differences and PyTorch autograd (a gate on each head's
output); importance equal to |dL/dxi| normalised per block; a pruned model equal to the
original with those heads gated off (float64, 1e-12); save/load of pruned models (tinyvit's
file, Hugging Face with ``config.pruned_heads``); bad input.
"""
import math

import numpy as np
import pytest

from tinyvit import VisionTransformer
from tinyvit.layers.loss import softmax_cross_entropy
from tinyvit.pruning import head_importance, least_important, prune_heads
from tests.test_tome import numeric_grad
from tests.tolerances import FD_TOLERANCE, TOLERANCES, assert_close


def small(**kw):
    args = dict(image_size=8, patch_size=2, num_classes=5, dim=16, depth=3, heads=4, mlp_dim=24, channels=1,
                dtype="float64", seed=0)
    args.update(kw)
    return VisionTransformer(**args)


def images(batch=3, seed=0, size=8):
    return np.random.default_rng(seed).standard_normal((batch, 1, size, size))


def randomize(m, seed=1):
    """Weights of order 1 so every head matters (timm's 0.02 init makes heads nearly equal)."""
    rng = np.random.default_rng(seed)
    m.load_state_dict({k: rng.standard_normal(v.shape) * (0.4 if v.ndim > 1 else 0.2) + ("norm" in k and "weight" in k)
                       for k, v in m.state_dict().items()})
    return m


def test_gate_gradient_against_finite_differences_and_pytorch():
    torch = pytest.importorskip("torch")
    from tests.torch_twin import torch_params

    m = randomize(small(pool="cls"))
    x = images()
    gates = {0: np.array([1.0, 0.5, 2.0, 1.0]), 2: np.array([0.0, 1.0, 1.0, -0.5])}
    dlogits = np.random.default_rng(2).standard_normal((3, 5))
    m.set_head_gates(gates)
    m.forward(x)
    m.backward(dlogits)
    got = dict(m.gate_grads)
    for block, gate in gates.items():
        def f(gate=gate, block=block):
            m.set_head_gates({**gates, block: gate})
            return m.forward(x)
        assert_close(f"dgate {block}", got[block], numeric_grad(f, gate, dlogits), **FD_TOLERANCE)
    # PyTorch: the gate multiplies each head's output O_h before proj, autograd gives dL/dxi
    p = torch_params(m.state_dict())
    tg = {i: torch.tensor(g, requires_grad=True) for i, g in gates.items()}
    c, F = m.config, torch.nn.functional
    t = F.conv2d(torch.tensor(x), p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=2)
    t = torch.cat([p["cls_token"].expand(3, -1, -1), t.flatten(2).transpose(1, 2)], 1) + p["pos_embed"]
    for i in range(c.depth):
        g = lambda k: p[f"blocks.{i}.{k}"]  # noqa: E731
        h = F.layer_norm(t, (16,), g("norm1.weight"), g("norm1.bias"), 1e-6)
        q, k, v = F.linear(h, g("attn.qkv.weight"), g("attn.qkv.bias")).reshape(3, t.shape[1], 3, 4, 4).permute(2, 0, 3, 1, 4)
        o = ((q @ k.transpose(-2, -1)) / 2.0).softmax(-1) @ v  # (B, NH, N, hs): O_h
        if i in tg:
            o = o * tg[i][None, :, None, None]
        t = t + F.linear(o.transpose(1, 2).reshape(3, -1, 16), g("attn.proj.weight"), g("attn.proj.bias"))
        h = F.layer_norm(t, (16,), g("norm2.weight"), g("norm2.bias"), 1e-6)
        t = t + F.linear(F.gelu(F.linear(h, g("mlp.fc1.weight"), g("mlp.fc1.bias"))), g("mlp.fc2.weight"),
                         g("mlp.fc2.bias"))
    t = F.layer_norm(t, (16,), p["norm.weight"], p["norm.bias"], 1e-6)
    logits = F.linear(t[:, 0], p["head.weight"], p["head.bias"])
    m.set_head_gates(gates)
    assert_close("logits", m.forward(x), logits.detach().numpy(), **TOLERANCES["float64"])
    logits.backward(torch.tensor(dlogits))
    m.backward(dlogits)
    for i in gates:
        assert_close(f"dgate {i} vs torch", m.gate_grads[i], tg[i].grad.numpy(), **TOLERANCES["float64"])


def test_head_importance_is_the_mean_abs_gate_gradient_normalised_per_block():
    m = randomize(small())
    batches = [(images(3, s), np.array([0, 1, 2])) for s in (3, 4)]
    got = head_importance(m, batches)
    raw = head_importance(m, batches, normalize=False)
    expected = []
    for i in range(3):
        per_batch = []
        for x, y in batches:
            def loss(gate, i=i, x=x, y=y):
                m.set_head_gates({**{j: np.ones(4) for j in range(3)}, i: gate})
                return softmax_cross_entropy(m.forward(x), y)[0]
            g = np.ones(4)
            per_batch.append(np.abs(numeric_grad(lambda: np.asarray(loss(g)), g, np.ones(()))))
        expected.append(np.mean(per_batch, axis=0))
    m.set_head_gates(None)
    for i in range(3):
        assert_close(f"raw importance {i}", raw[i], expected[i], **FD_TOLERANCE)
        np.testing.assert_allclose(got[i], raw[i] / np.linalg.norm(raw[i]), rtol=1e-12)
    assert m.head_gates == {} and m.gate_grads == {}  # the model is left as it was
    order = least_important(got, 5)
    assert sum(len(v) for v in order.values()) == 5 and all(len(v) < 4 for v in order.values())
    flat = sorted((got[i][h], i, h) for i in range(3) for h in range(4))
    assert (flat[0][1], flat[0][2]) in [(i, h) for i, hs in order.items() for h in hs]


@pytest.mark.parametrize("pool,distilled,qkv_bias", [("cls", False, True), ("mean", False, False),
                                                     ("cls", True, True)])
def test_pruned_model_equals_the_original_with_those_heads_gated_off(pool, distilled, qkv_bias):
    m = randomize(small(pool=pool, distilled=distilled, qkv_bias=qkv_bias))
    x = images()
    plan = {0: [1, 3], 2: [0]}
    pruned = prune_heads(m, plan)
    assert pruned.config.block_heads == (2, 4, 3)
    assert pruned.params["blocks.0.attn.qkv.weight"].shape == (3 * 2 * 4, 16)
    assert pruned.params["blocks.0.attn.proj.weight"].shape == (16, 2 * 4)
    assert pruned.num_params() < m.num_params()
    m.set_head_gates({0: [1, 0, 1, 0], 2: [0, 1, 1, 1]})
    gated = m.forward(x)
    np.testing.assert_allclose(pruned.forward(x), gated, rtol=0, atol=1e-12)
    # a second pruning counts the heads the block has now
    twice = prune_heads(pruned, {0: [0], 1: [2]})
    assert twice.config.block_heads == (1, 3, 3)
    m.set_head_gates({0: [0, 0, 1, 0], 1: [1, 1, 0, 1], 2: [0, 1, 1, 1]})
    np.testing.assert_allclose(twice.forward(x), m.forward(x), rtol=0, atol=1e-12)
    # and it trains: the backward of the smaller blocks against finite differences
    dlogits = np.random.default_rng(5).standard_normal((3, 5))
    twice.forward(x)
    twice.backward(dlogits)
    key = "blocks.0.attn.qkv.weight"
    assert_close(key, twice.grads[key], numeric_grad(lambda: twice.forward(x), twice.params[key], dlogits),
                 **FD_TOLERANCE)


def test_pruned_models_save_and_load(tmp_path):
    from tinyvit.pretrained.weights import export_pretrained, open_model

    m = randomize(small())
    pruned = prune_heads(m, {1: [0, 2]})
    x = images()
    path = tmp_path / "pruned.safetensors"
    export_pretrained(pruned, str(path))
    loaded = open_model(str(path)).model
    assert loaded.config.block_heads == (4, 2, 4)
    np.testing.assert_array_equal(loaded.forward(x), pruned.forward(x))


def test_what_hugging_face_loads_of_a_pruned_model():
    """transformers 4.x builds a ViT with fewer heads per layer from ``config.pruned_heads`` (it prunes on
    construction), so the smaller query/key/value/output weights load and the logits agree (float64).
    transformers 5 removed head pruning (no ``prune_heads``, one head count for every layer): there a
    pruned model does not load, and this test checks that it is refused, not silently misread."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tinyvit.pretrained.convert import from_tinyvit

    m = randomize(small(gelu="none"))
    pruned = prune_heads(m, {0: [3], 2: [0, 1]})
    c = pruned.config
    cfg = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=3,
                                 num_attention_heads=4, intermediate_size=24, layer_norm_eps=1e-6, num_labels=5,
                                 hidden_act="gelu", qkv_bias=True,
                                 pruned_heads={i: list(range(4 - n)) for i, n in enumerate(c.block_heads) if n < 4})
    hf = transformers.ViTForImageClassification(cfg).double().eval()
    if not hasattr(hf, "prune_heads"):  # transformers >= 5
        q = [k for k in hf.state_dict() if k.endswith("q_proj.weight") or k.endswith("query.weight")]
        assert all(tuple(hf.state_dict()[k].shape) == (16, 16) for k in q)  # every layer keeps all 4 heads
        smaller = {k: torch.zeros(8, 16, dtype=torch.float64) for k in q[:1]}
        with pytest.raises(RuntimeError, match="size mismatch"):
            hf.load_state_dict(smaller, strict=False)
        return
    sd = {k: torch.tensor(v) for k, v in from_tinyvit(pruned.state_dict(), "hf").items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("pooler" in k for k in missing)
    x = images()
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(x)).logits.numpy()
    assert_close("HF logits", pruned.forward(x), ref, **TOLERANCES["float64"])


def test_bad_input_is_named():
    m = small()
    with pytest.raises(ValueError, match=r"pruning every head of block 1 \(4 of 4\)"):
        prune_heads(m, {1: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match=r"cannot prune heads of block 5: the model has 3 blocks \(0 to 2\)"):
        prune_heads(m, {5: [0]})
    with pytest.raises(ValueError, match=r"block 0 has 4 heads \(0 to 3\); cannot prune \[4\]"):
        prune_heads(m, {0: [4]})
    with pytest.raises(ValueError, match="repeat"):
        prune_heads(m, {0: [1, 1]})
    with pytest.raises(ValueError, match=r"head gate on block 3, but the model has 3 blocks \(0 to 2\)"):
        m.set_head_gates({3: [1, 1, 1, 1]})
    with pytest.raises(ValueError, match=r"head gate of block 0 must be 4 finite numbers"):
        m.set_head_gates({0: [1, 1]})
    pruned = prune_heads(m, {0: [0]})
    with pytest.raises(ValueError, match=r"head gate of block 0 must be 3 finite numbers"):
        pruned.set_head_gates({0: [1, 1, 1, 1]})
    with pytest.raises(ValueError, match=r"block_heads\[1\] must be an int in \[1, heads=4\]"):
        small(block_heads=[4, 0, 4])
    with pytest.raises(ValueError, match="at least one batch"):
        head_importance(m, [])
    assert m.config.block_heads is None and m.head_gates == {}  # nothing changed by the failures


def test_pruned_model_and_gates_on_strict_arrays():
    from tinyvit.backend import Backend
    from tests.strict_array import StrictArray, strict_xp

    strict = Backend("strict", strict_xp)
    m = VisionTransformer(image_size=8, patch_size=2, num_classes=5, dim=16, depth=2, heads=4, mlp_dim=24,
                          channels=1, backend=strict, dtype="float32")
    pruned = prune_heads(m, {0: [1, 2]})
    x = strict.asarray(images().astype(np.float32))
    y = strict.asarray(np.array([0, 1, 2]))
    scores = head_importance(pruned, [(x, y)])
    assert [s.shape for s in scores] == [(2,), (4,)] and all(math.isfinite(v) for s in scores for v in s)
    _, d = softmax_cross_entropy(pruned.forward(x, train=True), y)
    assert isinstance(pruned.backward(d), StrictArray)
