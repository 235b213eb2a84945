"""Reading weight files safely, position-embedding resampling, load_pretrained / export_pretrained.

Resampling is checked against ``torch.nn.functional.interpolate(mode="bicubic",
align_corners=False)`` in float64, with and without ``antialias``, enlarging and shrinking,
square and not: tolerance 1e-12 absolute on O(1) values (the two differ only in
summation order).
"""
import os
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinyvit import VisionTransformer
from tinyvit.pretrained.convert import from_tinyvit
from tinyvit.pretrained.weights import (bicubic_weights, export_pretrained, load_pretrained, read_checkpoint, read_state_dict,
                             resample_pos_embed, save_state_dict)

ATOL_RESAMPLE = 1e-12
SMALL = dict(image_size=32, patch_size=8, num_classes=5, dim=48, depth=2, heads=4, mlp_dim=96)


def small_model(seed=0, dtype="float64", **kw):
    m = VisionTransformer(**{**SMALL, **kw}, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    m.load_state_dict({k: v + rng.standard_normal(v.shape) * 0.1 for k, v in m.state_dict().items()})
    return m


def torch_resample(pos, new_grid, old_grid, prefix, antialias):
    t = torch.tensor(pos)
    grid = t[:, prefix:].reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
    return torch.cat([t[:, :prefix], grid], dim=1).numpy()


# ------------------------------------------------------------------ resampling
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("old_grid,new_grid,prefix", [
    ((14, 14), (24, 24), 1),  # 224 -> 384 at patch 16
    ((14, 14), (7, 7), 1),  # shrink
    ((4, 4), (6, 6), 2),  # DeiT: two prefix tokens
    ((5, 3), (2, 7), 1),  # not square, shrink one axis, grow the other
    ((1, 1), (3, 3), 0),
])
def test_resample_matches_torch_interpolate(old_grid, new_grid, prefix, antialias):
    pos = np.random.default_rng(0).standard_normal((1, prefix + old_grid[0] * old_grid[1], 8))
    ours = resample_pos_embed(pos, new_grid, old_grid, prefix, antialias=antialias)
    ref = torch_resample(pos, new_grid, old_grid, prefix, antialias)
    assert ours.shape == ref.shape == (1, prefix + new_grid[0] * new_grid[1], 8)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL_RESAMPLE)
    np.testing.assert_array_equal(ours[:, :prefix], pos[:, :prefix])  # class token kept as it is


def test_resample_identity_and_dtype():
    pos = np.random.default_rng(0).standard_normal((1, 17, 8)).astype(np.float32)
    np.testing.assert_array_equal(resample_pos_embed(pos, 4), pos)
    assert resample_pos_embed(pos, 6).dtype == np.float32
    for n, antialias in ((9, False), (9, True), (3, True), (5, False)):
        np.testing.assert_allclose(bicubic_weights(4, n, antialias).sum(axis=1), 1.0, atol=1e-14)  # rows keep constants


def test_resample_errors():
    pos = np.zeros((1, 17, 8))
    with pytest.raises(ValueError, match=r"\(1, N, D\)"):
        resample_pos_embed(np.zeros((17, 8)), 4)
    with pytest.raises(ValueError, match="not a square grid; pass old_grid"):
        resample_pos_embed(np.zeros((1, 1 + 8, 8)), 4)
    with pytest.raises(ValueError, match="old_grid .* has 12 cells but pos_embed has 16"):
        resample_pos_embed(pos, 4, (3, 4))
    with pytest.raises(ValueError, match="new_grid must be a positive int"):
        resample_pos_embed(pos, (0, 4))


def test_load_pretrained_at_another_size_resamples(tmp_path):
    m = small_model()
    path = tmp_path / "w.safetensors"
    save_state_dict(path, m.state_dict())
    big = load_pretrained(path, heads=4, image_size=48, dtype="float64")
    assert big.config.image_size == (48, 48)
    np.testing.assert_allclose(big.params["pos_embed"], resample_pos_embed(m.params["pos_embed"], 6), atol=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 48))
    assert np.isfinite(big.forward(x)).all()
    notes = read_checkpoint(path, heads=4, image_size=48).notes
    assert any("resampled bicubic from a 4x4 to a 6x6" in n for n in notes)


# ------------------------------------------------------------------ files
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_read_round_trip(tmp_path, suffix):
    sd = small_model().state_dict()
    path = tmp_path / f"w{suffix}"
    save_state_dict(path, sd)
    back = read_state_dict(path)
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp") or p.endswith(".tmp")]  # no temp left


def test_save_refuses_non_finite(tmp_path):
    sd = small_model().state_dict()
    sd["head.bias"][0] = np.nan
    with pytest.raises(ValueError, match="head.bias: holds non-finite"):
        save_state_dict(tmp_path / "w.safetensors", sd)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("layout", ["timm", "torchvision", "hf"])
def test_torch_files_in_every_layout(tmp_path, layout):
    """.pth/.bin via torch.load(weights_only=True), wrapped or not, in each library's names."""
    m = small_model()
    theirs = {k: torch.tensor(v) for k, v in from_tinyvit(m.state_dict(), layout).items()}
    torch.save(theirs, tmp_path / "plain.pth")
    torch.save({"model": theirs, "epoch": 3}, tmp_path / "wrapped.bin")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32))
    for name in ("plain.pth", "wrapped.bin"):
        ours = load_pretrained(tmp_path / name, heads=4, layer_norm_eps=1e-6, dtype="float64")
        np.testing.assert_allclose(ours.forward(x), m.forward(x), rtol=0, atol=1e-12)


def test_export_then_load_in_every_layout(tmp_path):
    m = small_model()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32))
    for layout in ("timm", "torchvision", "hf"):
        path = tmp_path / f"{layout}.safetensors"
        export_pretrained(m, path, layout)
        ckpt = read_checkpoint(path, heads=4, layer_norm_eps=1e-6)
        assert ckpt.layout == layout
        ours = load_pretrained(path, heads=4, layer_norm_eps=1e-6, dtype="float64")
        np.testing.assert_array_equal(ours.forward(x), m.forward(x))


def test_pickled_torch_content_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": Evil()}, path)
    with pytest.raises(ValueError, match=r"evil.pth.*weights_only=True\) refused"):
        read_state_dict(path)


def test_object_npz_is_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="obj.npz"):
        read_state_dict(path)


def test_truncated_files_are_clear_errors(tmp_path):
    sd = small_model().state_dict()
    for suffix in (".safetensors", ".npz", ".pth"):
        whole = tmp_path / f"whole{suffix}"
        if suffix == ".pth":
            torch.save({k: torch.tensor(v) for k, v in sd.items()}, whole)
        else:
            save_state_dict(whole, sd)
        data = whole.read_bytes()
        for cut in (1, 7, 9, 100, len(data) // 2, len(data) - 1):
            bad = tmp_path / f"cut{cut}{suffix}"
            bad.write_bytes(data[:cut])
            with pytest.raises(ValueError, match=f"cut{cut}"):
                read_state_dict(bad)


def test_foreign_and_missing_files(tmp_path):
    png = tmp_path / "image.safetensors"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(ValueError, match="image.safetensors.*not a weights file"):
        read_state_dict(png)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_state_dict(empty)
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="neither an .npz"):
        read_state_dict(z)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="directory without"):
        read_state_dict(tmp_path)


def test_bfloat16_safetensors_are_widened(tmp_path):
    from safetensors.torch import save_file

    sd = {k: torch.tensor(v).to(torch.bfloat16) for k, v in small_model().state_dict().items()}
    save_file(sd, tmp_path / "bf16.safetensors")
    back = read_state_dict(tmp_path / "bf16.safetensors")
    assert back["head.weight"].dtype == np.float32
    np.testing.assert_array_equal(back["head.weight"], sd["head.weight"].float().numpy())


def test_ddp_prefix_and_unsupported_keys_from_a_file(tmp_path):
    sd = small_model().state_dict()
    save_state_dict(tmp_path / "ddp.npz", {"module." + k: v for k, v in sd.items()})
    assert load_pretrained(tmp_path / "ddp.npz", heads=4).num_params() == small_model().num_params()
    save_state_dict(tmp_path / "ls.npz", dict(sd, **{"blocks.1.ls2.gamma": np.ones(48)}))
    with pytest.raises(ValueError, match="LayerScale"):
        load_pretrained(tmp_path / "ls.npz", heads=4)
