"""Files of named arrays, and training checkpoints, that run no code when read.

Two formats, chosen by the file name when writing and by the content when reading:

- ``.safetensors`` (the default; written and read with the ``safetensors`` library): an
  8-byte header length, a JSON header, raw little-endian tensor bytes. Metadata is a
  ``{str: str}`` map in the header.
- ``.npz`` (NumPy's zip of ``.npy`` files), read with ``allow_pickle=False``; metadata is
  a JSON string in a 0-d unicode array named ``__metadata__``.

Writes are atomic: the bytes go to a temporary file in the target's folder, are flushed
to disk, and ``os.replace`` puts them in place, so a crash leaves the old file or the new
one, never half of one. Files written here carry a SHA-256 over every key, dtype, shape,
array byte and metadata entry (``tinyvit.sha256``); reading checks it, so a truncated or
corrupted file at any byte is an error naming the file, never silently wrong numbers.

A checkpoint (:func:`save_checkpoint`) holds the model's weights (``model.<timm key>``),
the optimiser's state (``optim.<slot>.<timm key>``) and, in the metadata, the step, the
model config and dtype, the optimiser's hyper-parameters and step count, the model's
dropout generator state (``bit_generator.state`` as JSON) and the training config.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import NamedTuple

import numpy as np

from ..backend import to_host

FORMAT = "tinyvit-checkpoint-1"

# Size limits, checked before anything large is read or allocated (a small file must not cost gigabytes).
MAX_FILE_BYTES = int(os.environ.get("TINYVIT_MAX_FILE_BYTES", 8 * 2**30))  # a file, or an .npz's expanded arrays
MAX_HEADER_BYTES = 16 * 2**20  # a safetensors JSON header (ViT-B's is ~20 KB; the safetensors library allows 100 MB)
NPZ_RATIO_FLOOR = 64 * 2**20  # an .npz expanding past this ...
NPZ_MAX_RATIO = 50  # ... may expand at most this many times its compressed size
HASH_KEY = "tinyvit.sha256"
_NPZ_META = "__metadata__"


# ---------------------------------------------------------------- arrays <-> files
def _digest(arrays: dict, metadata: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.data if a.size else b"")  # the buffer itself: no copy of a large array
    for key in sorted(metadata):
        if key != HASH_KEY:
            h.update(f"meta\0{key}\0{metadata[key]}\0".encode())
    return h.hexdigest()


TMP_SUFFIX = ".tmp"


def _file_mode(path: str) -> int:
    """The mode a new file gets under the process umask (0644 under 0022), or the mode of the file being replaced."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def clean_stale_temp_files(path) -> list:
    """Remove the temporary files earlier writes of ``path`` left behind when killed.

    Temporary names are ``<name>.<pid>.<random>.tmp``; one whose process is gone (or is this
    process: its own write has finished or failed) is stale. Names without a pid (written by an
    older tinyvit) are removed when older than ten minutes. Returns the removed paths."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        if not (entry.startswith(name + ".") and entry.endswith(TMP_SUFFIX)):
            continue
        middle = entry[len(name) + 1:-len(TMP_SUFFIX)]
        pid_text = middle.split(".", 1)[0]
        full = os.path.join(folder, entry)
        if pid_text.isdigit() and "." in middle:
            pid = int(pid_text)
            stale = pid == os.getpid() or not _process_alive(pid)
        else:
            try:
                stale = time.time() - os.path.getmtime(full) > 600
            except OSError:
                stale = False
        if stale:
            try:
                os.unlink(full)
                removed.append(full)
            except OSError:
                pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    The file gets the mode a plain ``open`` would give (the umask's, or the replaced file's), not
    ``mkstemp``'s 0600. Temporary files that killed writes of the same path left are removed
    first (:func:`clean_stale_temp_files`). A failed write (disk full, ...) raises ``OSError``
    naming the path and leaves the old file as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path!r}: it is a directory")
    clean_stale_temp_files(path)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OSError(exc.errno, f"cannot write {path} ({exc.strerror or exc}); the old file, if any, is "
                                 f"unchanged") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


FIGURE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}


def atomic_save_figure(fig, path, dpi: int = 100) -> None:
    """Render a matplotlib figure in memory in the format the file name asks for (``.png``,
    ``.jpg``/``.jpeg``, ``.pdf``, ``.svg``), then :func:`atomic_write` it to ``path``. Another
    suffix is an error (never PNG bytes under a ``.jpg`` name)."""
    import io

    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in FIGURE_FORMATS:
        raise ValueError(f"{os.fspath(path)}: cannot tell the picture format from {suffix or 'no suffix'!r}; use one "
                         f"of {', '.join(FIGURE_FORMATS)}")
    buffer = io.BytesIO()
    kwargs = {"pil_kwargs": {"quality": 95}} if FIGURE_FORMATS[suffix] == "jpeg" else {}
    fig.savefig(buffer, format=FIGURE_FORMATS[suffix], dpi=dpi, **kwargs)
    atomic_write(path, buffer.getvalue())


def save_arrays(path, arrays: dict, metadata: dict | None = None) -> None:
    """Write ``{name: array}`` (host or device arrays) and ``{str: str}`` metadata to ``path``
    (``.safetensors`` or ``.npz``), atomically, with a checksum."""
    path = os.fspath(path)
    if not isinstance(arrays, dict) or not all(isinstance(k, str) for k in arrays):
        raise TypeError("arrays must be a dict of {str: array}")
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must be a dict of {str: str}")
    host = {}
    for key, value in arrays.items():
        a = np.ascontiguousarray(to_host(value))
        if a.dtype.kind not in "fiub":
            raise TypeError(f"array {key!r} has dtype {a.dtype}; only numeric arrays are written (no objects)")
        host[key] = a
    metadata[HASH_KEY] = _digest(host, metadata)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save

        data = save(host, metadata=metadata)
    elif path.endswith(".npz"):
        if _NPZ_META in host:
            raise ValueError(f"the array name {_NPZ_META!r} is reserved for the metadata")
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **host, **{_NPZ_META: np.array(json.dumps(metadata))})
        data = buffer.getvalue()
    else:
        raise ValueError(f"{path}: the file name must end in .safetensors or .npz")
    atomic_write(path, data)


def _read_bytes(path) -> bytes:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not an array file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"array file {path!r} does not exist")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {size:,} bytes, over the limit of {MAX_FILE_BYTES:,} (TINYVIT_MAX_FILE_BYTES)")
    with open(path, "rb") as f:
        return f.read()


# safetensors dtypes NumPy has no type for: named in the error instead of a KeyError('BF16')
NUMPY_LACKS = {"BF16": "bfloat16", "F8_E4M3": "float8 (e4m3)", "F8_E5M2": "float8 (e5m2)",
               "F8_E8M0": "float8 (e8m0)", "F4": "float4", "F6_E2M3": "float6", "F6_E3M2": "float6"}


class UnreadableDtype(ValueError):
    """A safetensors file holds tensors of a dtype NumPy cannot hold (``dtypes``: their safetensors names)."""

    def __init__(self, message: str, dtypes: set):
        super().__init__(message)
        self.dtypes = dtypes


def _claims_tinyvit(metadata: dict) -> bool:
    """True when metadata was written by tinyvit, so a checksum must be there: a tinyvit format,
    tinyvit's own keys, or a key one or two bytes away from the checksum's (a flipped bit)."""
    own = {"model_config", "train_config", "preprocessing", "labels", "optimizer", "rng", "extra", "layout",
           "tinyvit.format", "step", "data"}
    if str(metadata.get("format", "")).startswith("tinyvit") or own & set(metadata):
        return True
    for key in metadata:
        if key.startswith("tinyvit") or (len(key) == len(HASH_KEY)
                                          and sum(a != b for a, b in zip(key, HASH_KEY)) <= 2):
            return True
    return False


def _parse_safetensors(path, data: bytes):
    from safetensors.numpy import load

    if len(data) < 8:
        raise ValueError(f"{path}: truncated ({len(data)} bytes; a safetensors file starts with an 8-byte length)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(f"{path}: truncated or corrupt (header of {size} bytes, file of {len(data)})")
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: a JSON header of {size:,} bytes, over the limit of {MAX_HEADER_BYTES:,}; "
                         f"not parsed")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a map")
    except Exception as exc:  # json, unicode
        raise ValueError(f"{path}: corrupt safetensors file ({type(exc).__name__}: {exc})") from None
    lacking = {}
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) and name != "__metadata__" else None
        if dtype in NUMPY_LACKS:
            lacking.setdefault(dtype, []).append(name)
    if lacking:
        kinds = ", ".join(f"{NUMPY_LACKS[d]} ({len(v)} tensors, e.g. {v[0]})" for d, v in lacking.items())
        raise UnreadableDtype(f"{path}: holds {kinds}, which NumPy has no type for; load_pretrained / tinyvit "
                              f"predict read bfloat16 through PyTorch (widened to float32); float8/float4 weights "
                              f"need dequantising by the library that wrote them (or save the file as float32)",
                              set(lacking))
    try:
        arrays = load(data)
    except Exception as exc:  # SafetensorError
        raise ValueError(f"{path}: corrupt safetensors file ({type(exc).__name__}: {exc})") from None
    return arrays, metadata


def _parse_npz(path, data: bytes):
    arrays = read_npz(path, data, text=(_NPZ_META,))
    meta = arrays.pop(_NPZ_META, None)
    try:
        metadata = json.loads(str(meta)) if meta is not None else {}
    except ValueError as exc:
        raise ValueError(f"{path}: corrupt .npz metadata ({exc})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: corrupt .npz metadata (not a map)")
    return arrays, metadata


def read_npz(path, data: bytes | None = None, text: tuple = ()) -> dict:
    """``{name: array}`` of an ``.npz`` (from ``path``, or its bytes ``data``), checked before any large
    allocation, without ``numpy.load``:

    - every member is an ``.npy`` (NumPy's ``load`` returns the raw bytes of any other member);
    - the members expand to at most :data:`MAX_FILE_BYTES` in all, and an archive that expands
      past :data:`NPZ_RATIO_FLOOR` may expand at most :data:`NPZ_MAX_RATIO` times (a 1 MB file of
      compressed zeros must not become gigabytes);
    - each ``.npy`` header is read first: object dtypes (pickles) are refused, and the shape must
      fit in the bytes the member really holds, so a header cannot make tinyvit allocate more
      than the file delivers. Arrays are numeric, except the members named in ``text`` (strings).
    """
    import io
    import zipfile

    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if data is not None else path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt or unreadable .npz ({type(exc).__name__}: {exc})") from None
    arrays = {}
    with archive:
        infos = archive.infolist()
        odd = [i.filename for i in infos if not i.filename.endswith(".npy")]
        if odd:
            raise ValueError(f"{path}: a zip archive but not an .npz: members {odd[:5]} are not .npy arrays")
        total, packed = sum(i.file_size for i in infos), sum(i.compress_size for i in infos)
        if total > MAX_FILE_BYTES:
            raise ValueError(f"{path}: its arrays expand to {total:,} bytes, over the limit of {MAX_FILE_BYTES:,} "
                             f"(TINYVIT_MAX_FILE_BYTES)")
        if total > NPZ_RATIO_FLOOR and total > NPZ_MAX_RATIO * max(packed, 1):
            raise ValueError(f"{path}: {packed:,} compressed bytes expand to {total:,} ({total / max(packed, 1):.0f}x, "
                             f"over the limit of {NPZ_MAX_RATIO}x past {NPZ_RATIO_FLOOR:,} bytes): a decompression bomb")
        for info in infos:
            name = info.filename[:-len(".npy")]
            try:
                with archive.open(info) as f:
                    arrays[name] = _read_npy(f, info.file_size, name in text)
            except ValueError as exc:
                raise ValueError(f"{path}: member {info.filename}: {exc}") from None
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:  # CRC errors, truncation
                raise ValueError(f"{path}: member {info.filename} is corrupt ({type(exc).__name__}: {exc})") from None
    return arrays


def _read_npy(f, size: int, text_ok: bool = False) -> np.ndarray:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
    except ValueError:
        raise ValueError("not an .npy array (no NumPy header)") from None
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = fmt.read_array_header_2_0(f) if version == (2, 0) else _header_3_0(f)
    else:
        raise ValueError(f"unknown .npy version {version}")
    if dtype.hasobject:
        raise ValueError("holds Python objects (a pickle); tinyvit never unpickles")
    if dtype.kind not in "fiub" and not (text_ok and dtype.kind == "U"):
        raise ValueError(f"dtype {dtype} is not numeric (expected uint8, int, float or bool arrays)")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nbytes = count * dtype.itemsize
    if nbytes > size:
        raise ValueError(f"its header claims shape {shape} ({nbytes:,} bytes) but the member holds {size:,} bytes")
    buffer = bytearray(nbytes)
    got = f.readinto(memoryview(buffer)) if nbytes else 0
    while got < nbytes:
        more = f.readinto(memoryview(buffer)[got:])
        if not more:
            raise ValueError(f"truncated: {got:,} of {nbytes:,} array bytes")
        got += more
    array = np.frombuffer(buffer, dtype=dtype, count=count)
    return array.reshape(shape, order="F" if fortran else "C")


def _header_3_0(f):
    return np.lib.format._read_array_header(f, (3, 0))  # utf-8 field names; NumPy has no public reader


def load_arrays_and_metadata(path) -> tuple[dict, dict]:
    """``path -> ({name: NumPy array}, {str: str})``; the format is read from the content.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` naming the file for a
    directory, another format, a truncated or corrupt file, or a checksum mismatch."""
    return parse_arrays(_read_bytes(path), os.fspath(path))


def parse_arrays(data: bytes, path: str = "<bytes>") -> tuple[dict, dict]:
    """:func:`load_arrays_and_metadata` on a file's bytes (``path`` names it in errors)."""
    if data[:4] == b"PK\x03\x04":
        arrays, metadata = _parse_npz(path, data)
    elif len(data) >= 9 and data[8:9] == b"{":
        arrays, metadata = _parse_safetensors(path, data)
    elif len(data) < 9 and path.endswith((".safetensors", ".npz")):
        raise ValueError(f"{path}: truncated ({len(data)} bytes)")
    else:
        raise ValueError(f"{path}: not a safetensors or .npz file (starts with {data[:8]!r})")
    expected = metadata.get(HASH_KEY)
    if expected is None and _claims_tinyvit(metadata):
        raise ValueError(f"{path}: written by tinyvit but its checksum ({HASH_KEY}) is missing: the file is corrupt")
    if expected is not None and expected != _digest(arrays, metadata):
        raise ValueError(f"{path}: checksum mismatch: the file is corrupt")
    return arrays, {k: v for k, v in metadata.items() if k != HASH_KEY}


def load_arrays(path) -> dict:
    """``path -> {name: NumPy array}`` (see :func:`load_arrays_and_metadata`)."""
    return load_arrays_and_metadata(path)[0]


# ---------------------------------------------------------------- RNG state
def rng_state(rng):
    """A JSON-able copy of a generator's state: NumPy's ``bit_generator.state``; ``None`` for a
    generator that does not expose its state (CuPy's: its dropout stream cannot be resumed)."""
    state = getattr(getattr(rng, "bit_generator", None), "state", None)
    return state if isinstance(state, dict) else None


def set_rng_state(rng, state) -> None:
    if state is None or rng_state(rng) is None:
        return
    rng.bit_generator.state = state


# ---------------------------------------------------------------- checkpoints
class Checkpoint(NamedTuple):
    params: dict  # {timm key: host array}
    optim_arrays: dict  # {"slot.key": host array}
    meta: dict  # format, step, model_config, dtype, optimizer, rng, train_config, extra (parsed JSON)
    path: str


def save_checkpoint(path, model, optimizer, step: int, train_config: dict | None = None,
                    extra: dict | None = None, data: dict | None = None) -> None:
    """Write model weights, optimiser state, step, the model's RNG state and the configs, and
    the model's class names and preprocessing (``model.labels``, ``model.preprocessing``), so
    ``load_pretrained`` / ``tinyvit predict`` read the checkpoint as it was trained.

    Non-finite weights are refused (``ValueError``) and the old file stays."""
    params = model.state_dict()
    bad = [k for k, v in params.items() if not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"refusing to save non-finite weights (NaN/Inf in {bad[:5]}) to {os.fspath(path)}")
    optim_arrays, optim_meta = optimizer.state_dict()
    bad = [k for k, v in optim_arrays.items() if np.asarray(v).dtype.kind == "f" and not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"refusing to save a non-finite optimiser state (NaN/Inf in {bad[:5]}) to {os.fspath(path)}")
    arrays = {f"model.{k}": v for k, v in params.items()}
    arrays.update({f"optim.{k}": v for k, v in optim_arrays.items()})
    meta = {
        "format": FORMAT, "step": json.dumps(int(step)), "model_config": json.dumps(model.config.to_dict()),
        "dtype": model.dtype, "optimizer": json.dumps(optim_meta), "rng": json.dumps(rng_state(model.rng)),
        "train_config": json.dumps(train_config or {}), "extra": json.dumps(extra or {}),
        "labels": json.dumps(getattr(model, "labels", None)),
        "preprocessing": json.dumps(_as_dict(getattr(model, "preprocessing", None))),
    }
    if data is not None:
        meta["data"] = json.dumps(data)  # the data split: source, fraction, seed, fingerprint
    save_arrays(path, arrays, meta)


def _as_dict(preprocessing):
    return preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else preprocessing


def load_checkpoint(path) -> Checkpoint:
    """Read and check a checkpoint file; nothing is applied (see :func:`restore`)."""
    arrays, raw = load_arrays_and_metadata(path)
    path = os.fspath(path)
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tinyvit checkpoint (format {raw.get('format')!r}, expected {FORMAT!r}); "
                         f"for plain weights use load_arrays")
    try:
        meta = {k: (v if k in ("format", "dtype") else json.loads(v)) for k, v in raw.items()}
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt checkpoint metadata ({exc})") from None
    params = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    optim = {k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")}
    return Checkpoint(params, optim, meta, path)


def restore(ckpt: Checkpoint, model, optimizer) -> int:
    """Load a checkpoint into ``model`` and ``optimizer`` -> the step to continue from.

    All or nothing: if any part does not fit, model and optimiser are put back as they were."""
    saved_params, saved_rng = dict(model.params), rng_state(model.rng)
    saved_opt = ({s: dict(v) for s, v in optimizer.state.items()}, optimizer.t)
    try:
        if ckpt.meta.get("model_config") != model.config.to_dict():
            raise ValueError(f"{ckpt.path}: checkpoint was written by a model with config "
                             f"{ckpt.meta.get('model_config')}, this model has {model.config.to_dict()}")
        bad = [k for k, v in ckpt.optim_arrays.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v))]
        if bad:
            raise ValueError(f"{ckpt.path}: the optimiser state holds NaN/Inf in {bad[:5]}"
                             f"{' ...' if len(bad) > 5 else ''}; the file is damaged (resuming would make every "
                             f"update NaN): resume from an earlier checkpoint")
        model.load_state_dict(ckpt.params)
        optimizer.load_state_dict(ckpt.optim_arrays, ckpt.meta.get("optimizer") or {}, model.params)
        set_rng_state(model.rng, ckpt.meta.get("rng"))
    except Exception:
        model.params.clear()
        model.params.update(saved_params)
        set_rng_state(model.rng, saved_rng)
        optimizer.state, optimizer.t = saved_opt
        raise
    return int(ckpt.meta["step"])
