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
from typing import NamedTuple

import numpy as np

from ..backend import to_host

FORMAT = "tinyvit-checkpoint-1"
HASH_KEY = "tinyvit.sha256"
_NPZ_META = "__metadata__"


# ---------------------------------------------------------------- arrays <-> files
def _digest(arrays: dict, metadata: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    for key in sorted(metadata):
        if key != HASH_KEY:
            h.update(f"meta\0{key}\0{metadata[key]}\0".encode())
    return h.hexdigest()


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: folder {folder!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise



def atomic_save_figure(fig, path, dpi: int = 100) -> None:
    """Render a matplotlib figure to PNG in memory, then :func:`atomic_write` it to ``path``."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
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
    with open(path, "rb") as f:
        return f.read()


def _parse_safetensors(path, data: bytes):
    from safetensors.numpy import load

    if len(data) < 8:
        raise ValueError(f"{path}: truncated ({len(data)} bytes; a safetensors file starts with an 8-byte length)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(f"{path}: truncated or corrupt (header of {size} bytes, file of {len(data)})")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a map")
        arrays = load(data)
    except Exception as exc:  # json, unicode, SafetensorError
        raise ValueError(f"{path}: corrupt safetensors file ({type(exc).__name__}: {exc})") from None
    return arrays, metadata


def _parse_npz(path, data: bytes):
    import io

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        metadata = json.loads(str(arrays.pop(_NPZ_META))) if _NPZ_META in arrays else {}
        if not isinstance(metadata, dict):
            raise ValueError("metadata is not a map")
    except Exception as exc:  # BadZipFile, ValueError (pickled object arrays), EOFError, ...
        raise ValueError(f"{path}: corrupt or unreadable .npz ({type(exc).__name__}: {exc})") from None
    return arrays, metadata


def load_arrays_and_metadata(path) -> tuple[dict, dict]:
    """``path -> ({name: NumPy array}, {str: str})``; the format is read from the content.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` naming the file for a
    directory, another format, a truncated or corrupt file, or a checksum mismatch."""
    data = _read_bytes(path)
    path = os.fspath(path)
    if data[:4] == b"PK\x03\x04":
        arrays, metadata = _parse_npz(path, data)
    elif len(data) >= 9 and data[8:9] == b"{":
        arrays, metadata = _parse_safetensors(path, data)
    elif len(data) < 9 and path.endswith((".safetensors", ".npz")):
        raise ValueError(f"{path}: truncated ({len(data)} bytes)")
    else:
        raise ValueError(f"{path}: not a safetensors or .npz file (starts with {data[:8]!r})")
    expected = metadata.get(HASH_KEY)
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
                    extra: dict | None = None) -> None:
    """Write model weights, optimiser state, step, the model's RNG state and the configs, and
    the model's class names and preprocessing (``model.labels``, ``model.preprocessing``), so
    ``load_pretrained`` / ``tinyvit predict`` read the checkpoint as it was trained.

    Non-finite weights are refused (``ValueError``) and the old file stays."""
    params = model.state_dict()
    bad = [k for k, v in params.items() if not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"refusing to save non-finite weights (NaN/Inf in {bad[:5]}) to {os.fspath(path)}")
    optim_arrays, optim_meta = optimizer.state_dict()
    arrays = {f"model.{k}": v for k, v in params.items()}
    arrays.update({f"optim.{k}": v for k, v in optim_arrays.items()})
    meta = {
        "format": FORMAT, "step": json.dumps(int(step)), "model_config": json.dumps(model.config.to_dict()),
        "dtype": model.dtype, "optimizer": json.dumps(optim_meta), "rng": json.dumps(rng_state(model.rng)),
        "train_config": json.dumps(train_config or {}), "extra": json.dumps(extra or {}),
        "labels": json.dumps(getattr(model, "labels", None)),
        "preprocessing": json.dumps(_as_dict(getattr(model, "preprocessing", None))),
    }
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
