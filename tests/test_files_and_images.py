"""Issue 11, items 13-18: every image and file read right or refused.

Before: a 16-bit grey PNG became 99.6% white, a float TIFF in [0, 1] black, an int32 TIFF
white (predict, attention and the image-folder loader alike); ``load_state_dict`` turned
1e39 into inf, shared the caller's arrays and cast int64 without a word; 93 single-bit flips
of a header switched the checksum off; a 118-byte PNG cost 10 GB, a 1 MB .npz 1.1 GB, a
100 MB JSON header was parsed; bfloat16 and float8 files were a ``KeyError``.
"""
import json
import struct
import time
import zlib

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from tinyvit import VisionTransformer  # noqa: E402
from tinyvit.images import MAX_ASPECT, MAX_PIXELS, load_image, read_pixels  # noqa: E402
from tinyvit.pretrained.preprocess import Preprocessing  # noqa: E402
from tinyvit.training import checkpoint as ck  # noqa: E402
from tinyvit.training.data import load_image_folder  # noqa: E402

RAMP = np.linspace(0.0, 1.0, 64, dtype=np.float64).reshape(8, 8)  # what every file below holds


# ---------------------------------------------------------------- 13: pixel formats
def sixteen_bit(path):
    Image.fromarray(np.round(RAMP * 65535).astype(np.uint16)).save(path)


def test_16_bit_grey_is_scaled_not_saturated(tmp_path):
    sixteen_bit(tmp_path / "g.png")
    sixteen_bit(tmp_path / "g.tif")
    for name in ("g.png", "g.tif"):
        pixels, grey = read_pixels(tmp_path / name)
        assert grey and pixels.dtype == np.float32
        np.testing.assert_allclose(pixels, RAMP, atol=8e-6)  # half a 16-bit step
        assert (pixels >= 0.999).mean() < 0.05  # Pillow's own convert('L') made 99.6% of such pixels white
    pre = Preprocessing((8, 8), 1, (0.0,), (1.0,))(tmp_path / "g.png")
    np.testing.assert_allclose(pre.pixels[0], RAMP, atol=8e-6)  # half a 16-bit step  # predict / attention see the same values
    pre3 = Preprocessing((8, 8), 3, (0.0,) * 3, (1.0,) * 3)(tmp_path / "g.png")
    np.testing.assert_allclose(pre3.pixels, np.repeat(RAMP[None], 3, 0), atol=8e-6)


def test_the_image_folder_loader_reads_16_bit_and_float_right(tmp_path):
    for k, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        sixteen_bit(tmp_path / name / "x.png")
        Image.fromarray(RAMP.astype(np.float32)).save(tmp_path / name / "y.tif")
    ds = load_image_folder(tmp_path)
    assert ds.images.shape == (4, 1, 8, 8)
    for image in ds.images:
        np.testing.assert_allclose(image[0], RAMP, atol=8e-6)  # half a 16-bit step


def test_float_in_unit_range_is_kept_and_other_ranges_refused(tmp_path):
    Image.fromarray(RAMP.astype(np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_allclose(read_pixels(tmp_path / "f.tif")[0], RAMP, atol=1e-7)  # was black
    Image.fromarray((RAMP * 255).astype(np.float32)).save(tmp_path / "f255.tif")
    with pytest.raises(ValueError, match=r"float image with values 0 to 255.*\[0, 1\]"):
        read_pixels(tmp_path / "f255.tif")


def test_int32_without_a_range_is_refused(tmp_path):
    Image.fromarray(np.round(RAMP * 1000).astype(np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(ValueError, match="32-bit integer pixels.*no defined range"):
        read_pixels(tmp_path / "i.tif")
    with pytest.raises(ValueError, match="32-bit integer"):
        load_image(tmp_path / "i.tif")


def test_eight_bit_images_are_unchanged(tmp_path):
    Image.fromarray(np.round(RAMP * 255).astype(np.uint8)).save(tmp_path / "u.png")
    np.testing.assert_array_equal(read_pixels(tmp_path / "u.png")[0],
                                  np.round(RAMP * 255).astype(np.float32) / np.float32(255))


# ---------------------------------------------------------------- 16: image bombs
def png_header_only(path, width, height):
    """A PNG that declares width x height grey pixels and holds almost none."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * (width + 1) * min(height, 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size,match", [((40000, 1), "aspect ratio of 40000:1"), ((30000, 30000), "pixels"),
                                        ((9000, 8000), "over the limit")])
def test_image_bombs_are_refused_before_decoding(tmp_path, size, match):
    png_header_only(tmp_path / "bomb.png", *size)
    assert (tmp_path / "bomb.png").stat().st_size < 200
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        load_image(tmp_path / "bomb.png")
    assert time.perf_counter() - start < 5  # refused from the header (was 22 s and 10.4 GB for 40000x1)


def test_the_command_says_it_in_one_line(tmp_path, capsys):
    from tinyvit.cli import main

    png_header_only(tmp_path / "bomb.png", 40000, 1)
    m = VisionTransformer(image_size=16, patch_size=8, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=8)
    from tinyvit import export_pretrained

    export_pretrained(m, tmp_path / "m.safetensors")
    assert main(["predict", str(tmp_path / "bomb.png"), "--weights", str(tmp_path / "m.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"over the limit of {MAX_ASPECT}:1" in err
    assert MAX_PIXELS == 64 * 2**20


# ---------------------------------------------------------------- 14: load_state_dict
def tiny_model(dtype="float32"):
    return VisionTransformer(image_size=8, patch_size=4, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=8,
                             dtype=dtype)


def test_values_the_dtype_cannot_hold_are_refused():
    m = tiny_model()
    sd = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    sd["head.weight"][0, 0] = 1e39
    before = m.state_dict()
    with pytest.raises(ValueError, match=r"head.weight: values up to 1e\+39 overflow float32"):
        m.load_state_dict(sd)
    assert all(np.array_equal(v, before[k]) for k, v in m.state_dict().items())  # nothing loaded


def test_the_model_never_shares_the_callers_arrays():
    m = tiny_model()
    sd = m.state_dict()
    m.load_state_dict(sd)
    sd["head.weight"][:] = 123.0
    assert not np.any(m.state_dict()["head.weight"] == 123.0)


def test_integer_weights_are_refused():
    m = tiny_model()
    sd = m.state_dict()
    sd["head.bias"] = np.zeros(3, dtype=np.int64)
    with pytest.raises(ValueError, match="head.bias: dtype int64 is not floating point"):
        m.load_state_dict(sd)


# ---------------------------------------------------------------- 15: the checksum cannot be switched off
@pytest.mark.parametrize("kind", ["plain", "export"])
def test_no_single_bit_flip_of_the_header_loads(tmp_path, kind):
    """Every single-bit flip of the JSON header (key names, dtypes, shapes, offsets, metadata,
    the checksum and its key) is an error; before, flips of the key ``tinyvit.sha256`` made the
    file load unchecked."""
    from tinyvit import export_pretrained

    path = tmp_path / "w.safetensors"
    if kind == "plain":
        ck.save_arrays(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)})
    else:
        m = VisionTransformer(image_size=8, patch_size=4, num_classes=2, dim=4, depth=1, heads=1, mlp_dim=4,
                              channels=1)
        export_pretrained(m, path)
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    ck.parse_arrays(bytes(data))  # the file itself loads
    loaded = []
    for byte in range(8, header_end):
        for bit in range(8):
            data[byte] ^= 1 << bit
            try:
                ck.parse_arrays(bytes(data), str(path))  # what load_arrays does after reading the bytes
                loaded.append((byte, bit, bytes(data[byte:byte + 1])))
            except ValueError:
                pass
            data[byte] ^= 1 << bit
    assert not loaded, f"{len(loaded)} of {(header_end - 8) * 8} single-bit flips loaded: {loaded[:5]}"


def test_a_missing_checksum_on_a_tinyvit_file_is_an_error(tmp_path):
    from safetensors.numpy import save

    for meta in ({"format": "tinyvit-checkpoint-1"}, {"tinyvit.sha257": "0" * 64}, {"model_config": "{}"}):
        (tmp_path / "w.safetensors").write_bytes(save({"a": np.ones(2, np.float32)}, metadata=meta))
        with pytest.raises(ValueError, match="checksum"):
            ck.load_arrays(tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(save({"a": np.ones(2, np.float32)}, metadata={"format": "pt"}))
    assert ck.load_arrays(tmp_path / "w.safetensors")["a"].tolist() == [1.0, 1.0]  # a foreign file has none


# ---------------------------------------------------------------- 16: file size limits
def test_an_npz_bomb_is_refused_before_expanding(tmp_path):
    np.savez_compressed(tmp_path / "bomb.npz", w=np.zeros(300 * 2**20, np.uint8))  # ~300 KB -> 300 MB
    assert (tmp_path / "bomb.npz").stat().st_size < 2**20
    with pytest.raises(ValueError, match="decompression bomb"):
        ck.load_arrays(tmp_path / "bomb.npz")
    from tinyvit.training.data import load_npz

    with pytest.raises(ValueError, match="decompression bomb"):
        load_npz(tmp_path / "bomb.npz")


def test_an_npy_header_cannot_claim_more_than_its_member_holds(tmp_path):
    import io
    import zipfile

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (2**28,)})
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as z:
        z.writestr("w.npy", buffer.getvalue() + b"\0" * 16)
    with pytest.raises(ValueError, match="claims shape"):
        ck.load_arrays(tmp_path / "liar.npz")


def test_a_huge_json_header_is_not_parsed(tmp_path):
    header = json.dumps({"__metadata__": {"x": "y" * (ck.MAX_HEADER_BYTES + 10)}}).encode()
    (tmp_path / "h.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="JSON header of .* over the limit"):
        ck.load_arrays(tmp_path / "h.safetensors")


def test_files_over_the_size_limit_are_refused_before_reading(tmp_path, monkeypatch):
    ck.save_arrays(tmp_path / "w.safetensors", {"a": np.ones(1000, np.float32)})
    monkeypatch.setattr(ck, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ValueError, match="over the limit of 1,000"):
        ck.load_arrays(tmp_path / "w.safetensors")


# ---------------------------------------------------------------- 18: clear messages
@pytest.mark.parametrize("dtype,name", [("BF16", "bfloat16"), ("F8_E4M3", "float8"), ("F8_E5M2", "float8")])
def test_dtypes_numpy_lacks_are_named(tmp_path, dtype, name):
    header = json.dumps({"w": {"dtype": dtype, "shape": [4], "data_offsets": [0, 8 if dtype == "BF16" else 4]}})
    header = header.encode() + b" " * (-len(header) % 8)
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(ValueError, match=name) as err:
        ck.load_arrays(tmp_path / "x.safetensors")
    assert "KeyError" not in str(err.value) and "NumPy has no type" in str(err.value)


def test_a_zip_that_is_not_an_npz_is_refused(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "x.npz", "w") as z:
        z.writestr("w.npy", b"raw bytes, no header")
    with pytest.raises(ValueError, match="not an .npy array"):
        ck.load_arrays(tmp_path / "x.npz")  # NumPy's load returned these bytes as a value
