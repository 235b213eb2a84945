"""``tinyvit train``: train a ViT end to end, the DeiT way, with every piece hand-written.

One step, read top to bottom (``train``)::

    batch    = the epoch's permutation (seeded by (seed, epoch))[i*B : (i+1)*B]
    idx      = batch[positions]                        this rank's share (K = 1: all of it)
    x, y     = host images (b, C, H, W), labels (b,)
    x        = random crop / flip / RandAugment       host NumPy, one generator per (seed, step, sample)
    x, t     = Mixup / CutMix -> soft targets (b, K)   one draw per step; partner: the batch reversed
    x        = (x - mean) / std                        training-set statistics
    x, t     -> the model's backend                    the one host-to-device copy of the step
    logits   = model.forward(x, train=True, rng=...)   dropout / drop path drawn per sample (randomness.py)
    loss, dlogits = cross-entropy (label smoothing)    or DeiT's hard distillation loss
    model.backward(S * dlogits, grad_ready=hook)       -> model.grads; K > 1: buckets all-reduced on the way
    grads = mean over the ranks                        (tinyvit/distributed)
    grads, inf = scaler.unscale(grads)                 fp16: divided by the loss scale S (amp.py); else S = 1
    grads, norm = clip_grad_norm(grads)
    inf (fp16 overflow) -> skip the step, halve S (GradScaler's rule; counted and reported)
    loss or norm not finite (on any rank) -> skip the step (nothing changes); a few in a row -> stop
    optimizer.step(model.params, grads, lr = warm-up + cosine(step))

Every random choice is a function of the run's seed, the step and the sample's place in the
global batch, so a run resumed from a checkpoint continues exactly, and ``mpiexec -n K``
computes what one process computes (docs/data_parallel.md).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from . import augment
from .amp import DynamicLossScaler
from .checkpoint import atomic_save_figure, atomic_write, load_checkpoint, restore, save_checkpoint
from .data import Normalizer, batches, epoch_order, load_dataset, split, to_backend
from .distill import hard_distillation_backward, hard_distillation_forward
from ..layers.loss import softmax_cross_entropy
from ..layers.precision import PRECISIONS
from ..model import VisionTransformer
from ..pretrained.preprocess import Preprocessing
from .optim import build_optimizer, clip_grad_norm, grad_global_norm, warmup_cosine
from .randomness import SampleRandom, sample_generator
from ..distributed import DEFAULT_BUCKET_MB, DistributedError, GradientAllReduce, SingleProcess, check_start, world
from ..distributed.comm import launched_rank, share_cores

CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    """Every choice of a run; saved in each checkpoint so a resumed run continues the same way.

    The defaults train on the bundled digits to >= 98% test accuracy in well under a minute
    on two CPU cores (measured in the README)."""

    data: str | None = None  # None: the bundled digits; "mnist5k"; a folder of class folders; an .npz
    test_fraction: float = 0.2  # seeded, stratified split
    split_seed: int = 0  # the split's own seed: one fixed test set whatever the training seed
    # model
    patch_size: int = 4  # 8x8 digits -> a 2x2 grid of 4x4 patches (patch 2 learned slower, see the README)
    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 192
    pool: str = "mean"  # mean of the patch tokens + fc_norm: learned faster than the class token here
    gelu: str = "tanh"  # cheaper than erf on the CPU; "none" is the exact GELU
    pos_embed: str = "learned"  # learned | sincos1d | sincos2d | rope_axial | rope_mixed (2D RoPE, docs/rope.md)
    rope_theta: float | None = None  # 2D RoPE frequency base; None: the paper's (100 axial, 10 mixed)
    attn_impl: str = "plain"  # plain | flash (tiled, memory linear in the tokens; docs/flash_attention.md)
    attn_block: int = 128  # flash's tile side
    attn_window: int = 0  # M > 0: Swin's windowed attention over M x M patches (docs/window_attention.md)
    attn_shift: bool = False  # shifted windows on every second block
    tome_r: int = 0  # ToMe: tokens merged in every block (docs/tome.md)
    patch_drop_rate: float = 0.0  # PatchDropout: share of the patch tokens dropped in each training step
    dropout: float = 0.1
    drop_path: float = 0.2
    # optimisation
    epochs: int = 60
    batch_size: int = 64
    optimizer: str = "adamw"  # adamw | sgd | nesterov
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float | None = None  # None: 3, capped at half the run (epochs / 2); see warmup()
    clip_grad: float = 1.0  # global-norm clip; 0 turns it off
    label_smoothing: float = 0.1
    # augmentation
    crop_padding: int = 0  # shifts of 1 pixel on 8x8 digits slowed learning more than they helped (README)
    flip: bool = False  # off for digits: a mirrored digit is another shape
    randaugment: int = 0  # ops per image; 0 = off
    ra_magnitude: float = 5.0
    mixup: float = 0.3  # Beta alpha; 0 = off (0.3 alone beat timm's 0.8 + CutMix 1.0 here, README)
    cutmix: float = 0.0  # Beta alpha; 0 = off; with both on, one of the two per batch (timm's policy)
    # DeiT distillation
    teacher: str | None = None  # a tinyvit checkpoint of a trained teacher
    distill_alpha: float = 0.5
    # machinery
    backend: str = "numpy"
    dtype: str = "float32"
    precision: str = "fp32"  # fp32 | fp16 | bf16: the matrix products' precision; float32 master weights
    seed: int = 0
    out: str = "runs/train"
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    eval_every: int = 1  # epochs between test evaluations (and checkpoints)
    blas_threads: int = 1  # BLAS threads for the run (0: the library's default); see train()
    # data parallel (mpiexec -n K): the gradient all-reduce's bucket size and overlap with the backward
    bucket_mb: float = DEFAULT_BUCKET_MB
    overlap: bool = True

    def warmup(self) -> float:
        """Warm-up epochs: the value given, or 3 (the DeiT-style default) capped at half the run, so a
        short run (``--epochs 1``) warms up for half its steps instead of failing."""
        return min(3.0, self.epochs / 2) if self.warmup_epochs is None else self.warmup_epochs

    def problems(self) -> list:
        """Every setting out of range, one line each (all of them, not only the first)."""
        out = []
        for name in ("epochs", "batch_size", "max_bad_steps", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                out.append(f"{name} must be an int >= 1, got {v!r}")
        for name in ("crop_padding", "randaugment", "seed", "split_seed", "blas_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                out.append(f"{name} must be an int >= 0, got {v!r}")
        for name in ("warmup_epochs", "mixup", "cutmix", "min_lr", "bucket_mb"):
            v = getattr(self, name)
            if name == "warmup_epochs" and v is None:
                continue
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                out.append(f"{name} must be a finite number >= 0, got {v!r}")
        epochs_ok = isinstance(self.epochs, int) and self.epochs >= 1
        if epochs_ok and isinstance(self.warmup_epochs, (int, float)) and self.warmup_epochs > self.epochs:
            out.append(f"warmup_epochs ({self.warmup_epochs}) cannot exceed epochs ({self.epochs})")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            out.append(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.test_fraction, (int, float)) and 0.0 < self.test_fraction < 1.0):
            out.append(f"test_fraction must lie in (0, 1), got {self.test_fraction!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            out.append(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            out.append(f"distill_alpha must lie in [0, 1], got {self.distill_alpha}")
        if self.teacher is not None and self.pool != "cls":
            out.append("distillation (teacher=...) needs pool='cls': the student's two heads read the class "
                       "and distillation tokens (on the command line --pool cls is the default with --teacher)")
        if self.precision not in PRECISIONS:
            out.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        elif self.precision != "fp32" and self.dtype != "float32":
            out.append(f"precision={self.precision!r} keeps float32 master weights: use dtype='float32', "
                       f"got {self.dtype!r}")
        elif self.precision != "fp32" and self.attn_impl != "plain":
            out.append(f"precision={self.precision!r} needs attn_impl='plain' (flash attention runs in float32)")
        if not (math.isfinite(self.clip_grad) and self.clip_grad >= 0):
            out.append(f"clip_grad must be > 0 (or 0 for no clipping), got {self.clip_grad}")
        return out

    def check(self) -> None:
        """Raise one ``ValueError`` listing every problem of :meth:`problems`."""
        problems = self.problems()
        if len(problems) == 1:
            raise ValueError(problems[0])
        if problems:
            raise ValueError(f"{len(problems)} settings are out of range: " + "; ".join(problems))


def data_fingerprint(train_set, test_set) -> str:
    """SHA-256 of the split a run trains and tests on: class names, every label and pixel of both
    sets, in order. A resumed run whose data gained, lost or changed images gets another one."""
    import hashlib

    h = hashlib.sha256(json.dumps(list(train_set.classes)).encode())
    for part in (train_set, test_set):
        h.update(f"{part.images.shape}".encode())
        h.update(np.ascontiguousarray(part.labels, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(part.images, dtype=np.float32).tobytes())
    return h.hexdigest()


def _check_same_data(path, saved, now: dict, accept: bool) -> None:
    if not isinstance(saved, dict) or "fingerprint" not in saved:
        print(f"tinyvit train: warning: {path} records no data fingerprint (an older checkpoint); cannot check that "
              f"the data is the same", file=sys.stderr)
        return
    if saved["fingerprint"] == now["fingerprint"]:
        return
    counts = (f"it trained on {saved.get('train_images')} images and tested on {saved.get('test_images')}; the data "
              f"now gives {now['train_images']} and {now['test_images']}")
    if accept:
        print(f"tinyvit train: warning: the data differs from the checkpoint's ({counts}); continuing as asked "
              f"(--accept-changed-data)", file=sys.stderr)
        return
    raise ValueError(f"{path}: the data split differs from the one this checkpoint was trained on ({counts}, or "
                     f"pixels changed); images may have moved between training and test. Pass "
                     f"--accept-changed-data to continue anyway, or start a new run")


def _diverged(cfg, model, optimizer, steps: list, ckpt_path: str, last_saved) -> str:
    """The message of a run stopped by NaN/Inf steps: what was non-finite, what is kept, what to try."""
    where = (f"the last good checkpoint, {ckpt_path} (step {last_saved}), is kept as it was"
             if last_saved is not None else "no checkpoint had been written yet")
    bad_weights = [k for k, v in model.params.items() if not bool(model.backend.xp.isfinite(v).all())]
    bad_state = [f"{slot}.{k}" for slot, d in optimizer.state.items() if isinstance(d, dict)
                 for k, v in d.items() if hasattr(v, "dtype") and not bool(model.backend.xp.isfinite(v).all())]
    if bad_state:
        cause = (f"the optimiser state holds NaN/Inf ({bad_state[:3]}{' ...' if len(bad_state) > 3 else ''}), so "
                 f"every update is NaN: the checkpoint it was resumed from is damaged; restart from an earlier one")
    elif bad_weights:
        cause = f"the weights hold NaN/Inf ({bad_weights[:3]}): an update overflowed; try a lower --lr (now {cfg.lr})"
    else:
        cause = (f"the weights are finite, so the loss blew up from them: try a lower --lr (now {cfg.lr}) or a "
                 f"smaller --clip-grad (now {cfg.clip_grad})")
    return (f"training diverged: the loss or gradient norm was NaN/Inf for {len(steps)} steps in a row "
            f"(steps {steps[0]}-{steps[-1]}), last at step {steps[-1]}; {cause}; {where}")


class TrainingDiverged(RuntimeError):
    """The loss or gradient was NaN/Inf for ``max_bad_steps`` steps in a row."""


def _build_model(cfg: TrainConfig, train_set) -> VisionTransformer:
    _, channels, height, width = train_set.images.shape
    return VisionTransformer(
        image_size=(height, width), patch_size=cfg.patch_size, num_classes=len(train_set.classes), dim=cfg.dim,
        depth=cfg.depth, heads=cfg.heads, mlp_dim=cfg.mlp_dim, channels=channels, dropout=cfg.dropout,
        pool=cfg.pool, backend=cfg.backend, dtype=cfg.dtype, seed=cfg.seed, drop_path_rate=cfg.drop_path,
        gelu=cfg.gelu, pos_embed=cfg.pos_embed, distilled=cfg.teacher is not None, attn_impl=cfg.attn_impl,
        attn_block=cfg.attn_block, rope_theta=cfg.rope_theta, attn_window=cfg.attn_window, attn_shift=cfg.attn_shift,
        precision=cfg.precision, tome_r=cfg.tome_r, patch_drop_rate=cfg.patch_drop_rate)


def load_model(path, backend=None, dtype=None) -> VisionTransformer:
    """A model rebuilt from a checkpoint's config and weights (e.g. a distillation teacher)."""
    ckpt = load_checkpoint(path)
    model = VisionTransformer.from_config(ckpt.meta["model_config"], backend=backend,
                                          dtype=dtype or ckpt.meta.get("dtype", "float32"))
    model.load_state_dict(ckpt.params)
    return model


def evaluate(model: VisionTransformer, images: np.ndarray, labels: np.ndarray, batch_size: int = 256,
             comm=None) -> float:
    """Top-1 accuracy of ``model.forward(x, train=False)`` over normalised host images
    (with a communicator: each rank scores a contiguous share and the counts are summed)."""
    comm = comm or SingleProcess()
    lo, hi = len(labels) * comm.rank // comm.size, len(labels) * (comm.rank + 1) // comm.size
    correct = 0
    for idx in batches(hi - lo, batch_size, np.arange(lo, hi), drop_last=False):
        x = model.backend.asarray(np.ascontiguousarray(images[idx]), dtype=model.dtype)
        pred = model.backend.to_host(model.forward(x).argmax(axis=1))  # (B,)
        correct += int((pred == labels[idx]).sum())
    return int(comm.allreduce_host([correct])[0]) / len(labels)


def augment_batch(cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, batch: np.ndarray, positions, step: int,
                  num_classes: int, fill: float):
    """Host augmentation of this rank's share of one global batch.

    ``batch: (B,)`` indices into ``images``/``labels``; ``positions: (b,)`` this rank's places in
    it (K = 1: all). ``-> (images (b, C, H, W), targets (b,) int or (b, K) soft)``. Crop, flip and
    RandAugment draw from each sample's own generator; Mixup/CutMix draw once per step and mix
    place g with place B-1-g, so a rank also prepares its samples' partners."""
    def prepared(places):  # (n,) places -> augmented images (n, C, H, W)
        x = images[batch[places]]
        if not (cfg.crop_padding or cfg.flip or cfg.randaugment):
            return x
        out = np.empty_like(x)
        for j, place in enumerate(places):
            rng = sample_generator(cfg.seed, step, int(place))
            one = x[j:j + 1]
            if cfg.crop_padding:
                one = augment.random_crop(one, rng, cfg.crop_padding, fill)
            if cfg.flip:
                one = augment.random_flip(one, rng)
            if cfg.randaugment:
                one = augment.rand_augment(one, rng, cfg.randaugment, cfg.ra_magnitude, fill)
            out[j] = one[0]
        return out

    positions = np.asarray(positions)
    x, y = prepared(positions), labels[batch[positions]]
    if not (cfg.mixup or cfg.cutmix):
        return x, y
    mix = augment.draw_mix(np.random.default_rng([cfg.seed, 2, step]), x.shape[2], x.shape[3], cfg.mixup, cfg.cutmix)
    partners = len(batch) - 1 - positions  # (b,) places of the partners
    local = partners - positions[0]  # positions is one contiguous range: partners inside it are already done
    px = x[local] if mix is None or np.all((local >= 0) & (local < len(positions))) else prepared(partners)
    return augment.apply_mix(x, px, y, labels[batch[partners]], num_classes, mix)


class _StopFlag:
    """Ctrl-C sets a flag; the loop finishes its step, saves, and stops. A second Ctrl-C aborts."""

    def __init__(self):
        self.set = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(cfg: TrainConfig, resume=None, progress: bool = True, on_step=None, stop_after: int | None = None,
          comm=None, overwrite: bool = False, accept_changed_data: bool = False) -> dict:
    """Run (or resume) a training run; return a summary dict.

    ``resume``: a checkpoint path; the run continues from its step with its weights,
    optimiser state and dropout generator. ``on_step(step, model)`` is called after each
    step (tests use it). ``stop_after``: stop (and save) after this many steps in all.

    ``comm``: a communicator from :func:`tinyvit.distributed.world` (default: one process).
    With K ranks each global batch of ``cfg.batch_size`` is split into K equal shares and the
    gradients are averaged; rank 0 alone prints and writes. A rank that fails before the first
    step, ranks started with different configs, or a batch that does not split over K raise the
    same :class:`~tinyvit.distributed.DistributedError` on every rank.

    BLAS threads: the matrices of a small ViT are tiny, and OpenBLAS's threads spin while
    they wait; on a 2-core machine shared with other work the default run took 108 s with
    two threads against 17 s with one (measured, see the README). So the run limits BLAS to
    ``cfg.blas_threads`` through threadpoolctl (``0`` leaves it alone)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it the BLAS keeps its own thread count
        threadpool_limits = None
    comm = comm or SingleProcess()
    started = []  # set once every rank has passed the start-up check
    try:
        if cfg.blas_threads and threadpool_limits is not None:
            with threadpool_limits(limits=cfg.blas_threads, user_api="blas"):
                return _train(cfg, resume, progress, on_step, stop_after, comm, started, overwrite,
                              accept_changed_data)
        return _train(cfg, resume, progress, on_step, stop_after, comm, started, overwrite, accept_changed_data)
    except Exception as exc:
        if comm.size == 1 or started or isinstance(exc, DistributedError):
            raise
        check_start(comm, {}, cfg.batch_size, error=exc)  # meet the others there: all stop with one message
        raise


def _weights_crc32(model) -> int:
    import zlib

    digest = 0
    for value in model.state_dict().values():
        digest = zlib.crc32(np.ascontiguousarray(value).tobytes(), digest)
    return digest


def _fingerprint(cfg, data_record: dict, model, step) -> dict:
    """What every rank must agree on before the first step: the config, the data, the weights and step it starts from
    (a fresh init, or the checkpoint it resumed)."""
    return {**asdict(cfg), **{f"data {k}": v for k, v in data_record.items()}, "start_step": int(step),
            "weights_crc32": _weights_crc32(model)}


def _ranks_agree(comm, model) -> bool:
    """True if every rank holds bit-identical weights (K = 1: trivially)."""
    if comm.size == 1:
        return True
    digests = comm.gather_object(_weights_crc32(model))
    return bool(comm.bcast_object(None if digests is None else len(set(digests)) == 1))


def _train(cfg, resume, progress, on_step, stop_after, comm, started, overwrite=False,
           accept_changed_data=False) -> dict:
    from tqdm import tqdm

    t_start = time.perf_counter()
    cfg.check()
    cfg = replace(cfg, warmup_epochs=float(cfg.warmup()))  # saved resolved, so a resume keeps the same schedule
    dataset = load_dataset(cfg.data)
    train_set, test_set = split(dataset, cfg.test_fraction, cfg.split_seed)
    norm = Normalizer.fit(train_set.images)
    test_x = norm(test_set.images)
    model = _build_model(cfg, train_set)
    model.labels = [str(c) for c in train_set.classes]
    model.preprocessing = Preprocessing(train_set.images.shape[2:], train_set.images.shape[1], norm.mean.ravel(),
                                        norm.std.ravel(), "stretch", name="trained")
    optimizer = build_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay)
    num_train, num_classes = len(train_set.labels), len(train_set.classes)
    steps_per_epoch = num_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({num_train} images)")
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    teacher = None
    if cfg.teacher is not None:
        teacher = load_model(cfg.teacher, backend=cfg.backend, dtype=cfg.dtype)
        teacher.check_images(model.backend.asarray(test_x[:1], dtype=model.dtype))
        if teacher.config.num_classes != num_classes:
            raise ValueError(f"teacher {cfg.teacher} predicts {teacher.config.num_classes} classes, the data has "
                             f"{num_classes}")

    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out!r} is a file, not a folder: name a folder for the checkpoint, "
                         f"history.json and curves.png")
    ckpt_path = os.path.join(cfg.out, CHECKPOINT_NAME)
    continuing = resume is not None and os.path.abspath(resume) == os.path.abspath(ckpt_path)
    if os.path.exists(ckpt_path) and not (overwrite or continuing):
        raise ValueError(f"{cfg.out} already holds a run ({CHECKPOINT_NAME}); pass --overwrite to replace it, "
                         f"--resume {ckpt_path} to continue it, or another --out")
    data_record = {"data": cfg.data, "test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed,
                   "fingerprint": data_fingerprint(train_set, test_set), "train_images": num_train,
                   "test_images": len(test_set.labels)}
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        _check_same_data(resume, ckpt.meta.get("data"), data_record, accept_changed_data)

    history = {"step_loss": [], "epoch": [], "train_loss": [], "train_acc": [], "test_acc": []}
    step = 0
    scaler = DynamicLossScaler(enabled=cfg.precision == "fp16")  # bf16 and fp32 need no loss scale
    if ckpt is not None:
        step = restore(ckpt, model, optimizer)
        if step > total_steps:
            raise ValueError(f"{resume} is at step {step}, past the {total_steps} steps of {cfg.epochs} epochs; "
                             f"pass more --epochs to continue it")
        extra = ckpt.meta.get("extra")
        history = extra.get("history", history) if isinstance(extra, dict) else history
        if isinstance(extra, dict) and "loss_scaler" in extra:
            scaler.load_state_dict(extra["loss_scaler"])
    last_saved = step if ckpt is not None and continuing else None

    # every rank: the same config, data, starting weights and step, or all stop here with one message
    check_start(comm, _fingerprint(cfg, data_record, model, step), cfg.batch_size)
    started.append(True)
    lead = comm.rank == 0  # rank 0 alone prints and writes
    share = cfg.batch_size // comm.size
    positions = np.arange(comm.rank * share, (comm.rank + 1) * share)  # this rank's places in every global batch
    reducer = GradientAllReduce(comm, cfg.bucket_mb, cfg.overlap)
    if lead:
        os.makedirs(cfg.out, exist_ok=True)

    def save(at_step):
        nonlocal last_saved
        if not lead:
            last_saved = at_step
            return
        save_checkpoint(ckpt_path, model, optimizer, at_step, asdict(cfg),
                        {"history": history, "normalizer": [norm.mean.ravel().tolist(), norm.std.ravel().tolist()],
                         "loss_scaler": scaler.state_dict()}, data=data_record)
        last_saved = at_step

    fill = 0.0  # augmentations see [0, 1] images before normalisation: 0 is black (the digits' background)
    bad_steps, skipped = 0, []
    epoch_loss, epoch_correct, epoch_seen = 0.0, 0, 0
    order_epoch, order = None, None
    images_done, t_loop = 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and lead), unit="step", dynamic_ncols=True,
               file=sys.stderr, desc="train")
    interrupted = False
    # NaN/Inf are caught in the loop, once per step, with a message that says what to do; NumPy's
    # RuntimeWarnings from inside the layers would only come first and say less.
    with _StopFlag() as stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        while step < total_steps:
            epoch, i = divmod(step, steps_per_epoch)
            if order_epoch != epoch:
                order, order_epoch = epoch_order(num_train, cfg.seed, epoch), epoch
            batch = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]  # the global batch
            idx = batch[positions]  # this rank's share
            xb, targets = augment_batch(cfg, train_set.images, train_set.labels, batch, positions, step, num_classes,
                                        fill)
            x, t = to_backend(model.backend, norm(xb), targets, cfg.dtype)  # (b, C, H, W), (b,) | (b, K)
            lr = warmup_cosine(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
            rng = SampleRandom(model.backend, cfg.seed, step, positions)  # dropout drawn per sample

            if teacher is None:
                logits = model.forward(x, train=True, rng=rng)  # (b, K)
                loss, dlogits = softmax_cross_entropy(logits, t, cfg.label_smoothing)
                model.backward(scaler.scale_grad(dlogits), grad_ready=reducer.grads_ready)  # fp16: backward of S * loss
            else:
                cls_logits, dist_logits = model.forward_distill(x, train=True, rng=rng)  # (b, K) each
                loss, _, cache = hard_distillation_forward(cls_logits, dist_logits, t, teacher.forward(x),
                                                           cfg.distill_alpha, cfg.label_smoothing)
                model.backward_distill(*(scaler.scale_grad(d) for d in hard_distillation_backward(cache)),
                                       grad_ready=reducer.grads_ready)
                logits = (cls_logits + dist_logits) * 0.5
            grads = reducer.finish(model.grads)  # the mean over the ranks (K = 1: model.grads)
            # fp16: / S, and inf/NaN found (an inf on any rank reaches every rank through the mean)
            grads, overflow = scaler.unscale(grads)
            if overflow:
                gnorm = math.inf  # the step is skipped; no norm of inf/NaN gradients to take
            elif cfg.clip_grad:
                grads, gnorm = clip_grad_norm(grads, cfg.clip_grad)
            else:
                gnorm = grad_global_norm(grads)
            hard = targets.argmax(axis=1) if targets.ndim == 2 else targets  # Mixup: the larger share
            correct = int((model.backend.to_host(logits.argmax(axis=1)) == hard).sum())
            local_loss = float(loss)  # device -> host: two scalars (and the predictions)
            # one small all-reduce: the global batch's loss, any rank's non-finite loss, accuracy, Ctrl-C
            sums = comm.allreduce_host([local_loss * len(idx), not math.isfinite(local_loss), correct, stop.set])
            loss_value = local_loss if comm.size == 1 else float(sums[0]) / len(batch)
            gnorm_value = float(gnorm)  # the same on every rank: the norm of the averaged gradient
            scaler.update(overflow)

            if overflow and not sums[1] and math.isfinite(loss_value):
                pass  # fp16 overflow under the loss scale: step skipped, S halved (GradScaler's rule), counted
            elif sums[1] or not (math.isfinite(loss_value) and math.isfinite(gnorm_value)):
                bad_steps += 1
                skipped.append(step)
                if lead:
                    bar.write(f"step {step}: loss {loss_value} / gradient norm {gnorm_value} is not finite; "
                              f"step skipped, weights unchanged")
                if bad_steps >= cfg.max_bad_steps:
                    bar.close()
                    raise TrainingDiverged(_diverged(cfg, model, optimizer, skipped[-bad_steps:], ckpt_path,
                                                     last_saved))
            else:
                bad_steps = 0
                optimizer.step(model.params, grads, lr)
                epoch_correct += int(sums[2])
                epoch_loss += loss_value * len(batch)
                epoch_seen += len(batch)
                history["step_loss"].append(loss_value)
            step += 1
            images_done += len(batch)
            if on_step is not None:
                on_step(step, model)
            rate = images_done / max(time.perf_counter() - t_loop, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{epoch_correct / max(epoch_seen, 1):.3f}",
                            img_s=f"{rate:.0f}", lr=f"{lr:.1e}", refresh=False)

            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch:
                epoch_done = step // steps_per_epoch
                history["epoch"].append(epoch_done)
                history["train_loss"].append(epoch_loss / max(epoch_seen, 1))
                history["train_acc"].append(epoch_correct / max(epoch_seen, 1))
                evaluate_now = epoch_done % cfg.eval_every == 0 or step == total_steps
                history["test_acc"].append(evaluate(model, test_x, test_set.labels, comm=comm) if evaluate_now else None)
                epoch_loss, epoch_correct, epoch_seen = 0.0, 0, 0
                if evaluate_now:
                    bar.set_postfix(loss=f"{loss_value:.3f}", test_acc=f"{history['test_acc'][-1]:.4f}",
                                    img_s=f"{rate:.0f}")
                    save(step)
            stopping = stop.set if comm.size == 1 else bool(sums[3])  # K > 1: every rank stops at the same step
            if stopping or (stop_after is not None and step >= stop_after):
                interrupted = stopping
                if last_saved != step:
                    save(step)
                break
    bar.close()
    test_acc = evaluate(model, test_x, test_set.labels, comm=comm)
    elapsed = time.perf_counter() - t_start
    summary = {
        "test_acc": test_acc, "steps": step, "total_steps": total_steps, "epochs": cfg.epochs,
        "seconds": elapsed, "images_per_s": images_done / max(time.perf_counter() - t_loop, 1e-9),
        "train_images": num_train, "test_images": len(test_set.labels), "params": model.num_params(),
        "skipped_steps": skipped, "loss_scale_skipped": scaler.skipped,
        "loss_scale": scaler.scale if scaler.enabled else None, "precision": cfg.precision,
        "interrupted": interrupted, "checkpoint": ckpt_path, "finished": step >= total_steps,
        "ranks": comm.size, "allreduce": dict(reducer.stats), "ranks_agree": _ranks_agree(comm, model),
    }
    if step >= total_steps and last_saved != step:
        save(step)
    summary["plot"] = None
    if lead:
        atomic_write(os.path.join(cfg.out, "history.json"),
                     json.dumps({"summary": summary, "history": history, "config": asdict(cfg)}, indent=1).encode())
        try:
            summary["plot"] = plot_curves(history, os.path.join(cfg.out, "curves.png"))
        except OSError as exc:  # the run and its checkpoint are done: a missing picture is a warning
            print(f"tinyvit train: warning: could not write curves.png ({exc}); the checkpoint and history.json "
                  f"are written", file=sys.stderr)
    summary["model"] = model
    return summary


def plot_curves(history: dict, path) -> str | None:
    """Loss per step and accuracy per epoch in one PNG (matplotlib, Agg); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(history["step_loss"], lw=0.6, alpha=0.6, label="step")
    if history["epoch"]:
        per_epoch = len(history["step_loss"]) / max(history["epoch"][-1], 1)
        ax_loss.plot([e * per_epoch for e in history["epoch"]], history["train_loss"], "o-", ms=3, label="epoch mean")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    ax_acc.plot(history["epoch"], history["train_acc"], "o-", ms=3, label="train (augmented; Mixup: larger share)")
    tests = [(e, a) for e, a in zip(history["epoch"], history["test_acc"]) if a is not None]
    if tests:
        ax_acc.plot(*zip(*tests), "s-", ms=3, label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------- command line
# Flags a resumed run may change, and how each is applied (``tinyvit train --resume ... --help``).
RESUME_CHANGEABLE = {
    "epochs": "more epochs: the cosine is re-laid to end at the new last step; steps taken keep their rates",
    "lr": "a new peak learning rate: the remaining steps follow warm-up + cosine scaled to it",
    "min_lr": "a new final learning rate for the remaining cosine",
    "eval_every": "how often to evaluate and save", "max_bad_steps": "how many non-finite steps stop the run",
    "blas_threads": "BLAS threads", "backend": "where the run continues (weights and optimiser state move)",
    "bucket_mb": "the all-reduce's bucket size", "overlap": "whether the all-reduce overlaps the backward",
}


def _explicit(args) -> dict:
    """The training settings given on the command line (argparse defaults are None here)."""
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if given.get("gelu") == "exact":
        given["gelu"] = "none"  # the model's name for the erf GELU (PyTorch's approximate='none')
    return given


def resume_config(path, given: dict, out=None) -> tuple:
    """The config a resumed run continues with: the checkpoint's, plus the flags in
    :data:`RESUME_CHANGEABLE`; any other flag that differs from the checkpoint is refused,
    all of them named in one ``ValueError``."""
    saved = load_checkpoint(path).meta.get("train_config")
    if not isinstance(saved, dict) or not saved:
        raise ValueError(f"{path}: its train_config is {type(saved).__name__ if saved else 'empty'}, not the "
                         f"settings of a run (a JSON object): cannot resume from it")
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise ValueError(f"{path}: its train_config has settings this tinyvit does not know: {unknown}")
    try:
        cfg = TrainConfig(**saved)
    except TypeError as exc:
        raise ValueError(f"{path}: corrupt train_config ({exc})") from None
    refused = []
    for key, value in given.items():
        if key == "out" or getattr(cfg, key) == value:
            continue
        if key in RESUME_CHANGEABLE:
            setattr(cfg, key, value)
        else:
            refused.append(f"--{key.replace('_', '-')} {value} (the checkpoint has {getattr(cfg, key)!r})")
    if refused:
        raise ValueError(f"--resume continues the checkpoint's run, which cannot change {'; '.join(refused)}; "
                         f"only {', '.join('--' + k.replace('_', '-') for k in RESUME_CHANGEABLE)} may change "
                         f"(start a new run with --out to train another way)")
    step = int(load_checkpoint(path).meta.get("step", 0))
    cfg.out = out if out is not None else os.path.dirname(os.path.abspath(path))
    return cfg, step


def run_train(args) -> int:
    given = _explicit(args)
    resume = args.resume
    how = ""
    if resume is not None:
        cfg, step = resume_config(resume, given, args.out)
        changed = sorted(k for k in given if k in RESUME_CHANGEABLE)
        how = "; ".join(f"{k}={getattr(cfg, k)}: {RESUME_CHANGEABLE[k]}" for k in changed)
    else:
        cfg = TrainConfig(**given)
        if args.teacher is not None and args.pool is None:
            cfg.pool = "cls"
    try:
        comm = world(cfg.backend)  # mpiexec -n K: MPI (NumPy) or NCCL (CuPy); otherwise one process
    except DistributedError as exc:  # e.g. mpi4py or NCCL missing: every rank fails alike, rank 0 says it
        if launched_rank() == 0:
            print(f"tinyvit train: error: {exc}", file=sys.stderr)
        return 1
    lead = comm.rank == 0
    share_cores(comm)  # K ranks on one machine: each its share of the cores for the CPU kernels
    if resume is not None and lead:
        print(f"resuming from {resume} at step {step}: its training config is used"
              f"{' with ' + how if how else ''}; results go to {cfg.out}", file=sys.stderr)
    if lead:
        print(f"tinyvit train: {'digits (bundled)' if cfg.data is None else cfg.data}, {cfg.epochs} epochs, batch "
              f"{cfg.batch_size}, {cfg.optimizer} lr {cfg.lr}, ViT dim {cfg.dim} depth {cfg.depth} patch "
              f"{cfg.patch_size}{', teacher ' + cfg.teacher if cfg.teacher else ''}, {cfg.backend}/{cfg.dtype}"
              f"{'' if cfg.precision == 'fp32' else ', mixed precision ' + cfg.precision}"
              f"{f', {comm.size} ranks ({comm.name}), {cfg.batch_size // comm.size} images each' if comm.size > 1 else ''}",
              file=sys.stderr)
    try:
        s = train(cfg, resume=resume, progress=not args.no_progress, comm=comm, overwrite=args.overwrite,
                  accept_changed_data=args.accept_changed_data)
    except (TrainingDiverged, DistributedError) as exc:  # raised on every rank alike: rank 0 says it once
        if lead:
            print(f"tinyvit train: {'error: ' if isinstance(exc, DistributedError) else ''}{exc}", file=sys.stderr)
        return 1
    except Exception:
        if comm.size == 1:
            raise
        import traceback

        print(f"tinyvit train: rank {comm.rank} of {comm.size} failed; stopping every rank", file=sys.stderr)
        traceback.print_exc()
        comm.abort(1)
        raise
    if not lead:
        return 130 if s["interrupted"] else 0
    state = "interrupted (Ctrl-C); resume with --resume " + s["checkpoint"] if s["interrupted"] else (
        "finished" if s["finished"] else "stopped")
    print(f"{state}: {s['steps']}/{s['total_steps']} steps in {s['seconds']:.1f} s "
          f"({s['images_per_s']:.0f} images/s), {s['params']:,} parameters")
    if s["ranks"] > 1:
        a = s["allreduce"]
        print(f"data parallel: {s['ranks']} ranks; {a['bytes'] / max(a['steps'], 1) / 2**20:.2f} MiB all-reduced per step "
              f"in {a['buckets'] / max(a['steps'], 1):.1f} buckets, {a['wait_s'] / max(a['steps'], 1) * 1e3:.2f} ms "
              f"per step waiting for it ({'overlapped with' if cfg.overlap else 'after'} the backward); "
              + ("the weights are identical on every rank" if s["ranks_agree"] else
                 "WARNING: the ranks' weights differ (the all-reduce gave different sums on different ranks)"))
    print(f"test accuracy: {s['test_acc'] * 100:.2f}% on {s['test_images']} held-out images")
    if s["skipped_steps"]:
        print(f"skipped non-finite steps: {s['skipped_steps']}")
    if s["loss_scale"] is not None:
        print(f"fp16 loss scale: {s['loss_scale']:g} at the end; {s['loss_scale_skipped']} steps skipped for inf/NaN "
              f"gradients under the scale (torch.amp.GradScaler's rule: halve and skip)")
    print(f"checkpoint: {s['checkpoint']}" + (f"\ncurves: {s['plot']}" if s["plot"] else ""))
    return 130 if s["interrupted"] else 0


def register(subparsers) -> None:
    d = TrainConfig()
    p = subparsers.add_parser("train", help="train a ViT (default: the bundled digits, >= 98%% test accuracy)",
                              description="Train a ViT with hand-written backward passes. Defaults: the bundled "
                                          "scikit-learn digits, a 4-block ViT, AdamW with warm-up + cosine.")
    a = p.add_argument
    a("--data", default=None, help="mnist5k (5,000 MNIST digits at 28x28, pip install -e '.[mnist]'), a folder "
                                "of class subfolders, or an .npz of images and labels (default: the bundled digits)")
    a("--test-fraction", type=float, default=d.test_fraction,
      help="share of each class held out for testing (stratified, seeded by --split-seed)")
    a("--split-seed", type=int, default=d.split_seed, help="seed of the train/test split (kept apart from --seed)")
    g = p.add_argument_group("model")
    g.add_argument("--patch-size", type=int, default=d.patch_size, help="side P of the square patches")
    g.add_argument("--dim", type=int, default=d.dim, help="token width D")
    g.add_argument("--depth", type=int, default=d.depth, help="number of encoder blocks")
    g.add_argument("--heads", type=int, default=d.heads, help="attention heads (must divide --dim)")
    g.add_argument("--mlp-dim", type=int, default=d.mlp_dim, help="hidden width F of each block's MLP")
    g.add_argument("--pool", choices=("cls", "mean"), default=None,
                   help=f"head input: mean of the patch tokens or the class token "
                        f"(default {d.pool}; cls with --teacher)")
    g.add_argument("--gelu", choices=("exact", "tanh", "none"), default=d.gelu,
                   help="GELU form: exact = the erf GELU (also 'none', PyTorch's approximate='none'); tanh = the "
                        "tanh approximation")
    g.add_argument("--pos-embed", choices=("learned", "sincos1d", "sincos2d", "rope_axial", "rope_mixed"),
                   default=d.pos_embed, help="position information: added to the tokens (learned, fixed sin-cos) or "
                                             "2D RoPE turning q and k in every block (axial fixed, mixed learned)")
    g.add_argument("--rope-theta", type=float, default=d.rope_theta,
                   help="2D RoPE frequency base (default: the paper's, 100 axial, 10 mixed)")
    g.add_argument("--attn-impl", choices=("plain", "flash"), default=d.attn_impl,
                   help="attention: plain (keeps the N x N probabilities) or flash (tiled; keeps only the output "
                        "and each row's logsumexp, recomputes the tiles in the backward)")
    g.add_argument("--attn-block", type=int, default=d.attn_block, help="flash: tile side in tokens")
    g.add_argument("--attn-window", type=int, default=d.attn_window,
                   help="windowed attention (Swin): each patch attends within its M x M window of the patch grid, "
                        "the class token globally (0: global attention)")
    g.add_argument("--attn-shift", action="store_true",
                   help="with --attn-window: shift the windows by M/2 on every second block (Swin's SW-MSA)")
    g.add_argument("--tome-r", type=int, default=d.tome_r,
                   help="token merging (ToMe): tokens merged in every block (0: off; too large an r is an error "
                        "that names the largest)")
    g.add_argument("--patch-drop-rate", type=float, default=d.patch_drop_rate,
                   help="PatchDropout: share of the patch tokens dropped in training (timm's patch_drop_rate)")
    g.add_argument("--dropout", type=float, default=d.dropout,
                   help="dropout after the attention projection and in the MLP")
    g.add_argument("--drop-path", type=float, default=d.drop_path, help="stochastic depth rate of the last block")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    g.add_argument("--optimizer", choices=("adamw", "sgd", "nesterov"), default=d.optimizer,
                   help="AdamW (decoupled weight decay), SGD with momentum 0.9, or Nesterov SGD")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (after warm-up)")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="weight decay (not on norms, biases, tokens, position embedding)")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help="linear warm-up length in epochs (default: 3, or half the run when --epochs is below 6)")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="global gradient-norm clip (0: off)")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="share of the target spread over all classes")
    g = p.add_argument_group("augmentation")
    g.add_argument("--crop-padding", type=int, default=d.crop_padding, help="random crop after this much padding")
    g.add_argument("--flip", action="store_true", help="random left-right flips")
    g.add_argument("--randaugment", type=int, default=d.randaugment, help="RandAugment ops per image (0: off)")
    g.add_argument("--ra-magnitude", type=float, default=d.ra_magnitude, help="RandAugment magnitude (0-10)")
    g.add_argument("--mixup", type=float, default=d.mixup, help="Mixup Beta alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=d.cutmix, help="CutMix Beta alpha (0: off)")
    g = p.add_argument_group("DeiT distillation")
    g.add_argument("--teacher", default=None, help="checkpoint of a trained tinyvit teacher; the student gets a "
                                                   "distillation token and head")
    g.add_argument("--distill-alpha", type=float, default=d.distill_alpha,
                   help="weight of the distillation head's loss (DeiT: 0.5)")
    g = p.add_argument_group("run")
    g.add_argument("--backend", choices=("numpy", "cupy"), default=d.backend, help="array backend")
    g.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype, help="compute dtype")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="matrix products in fp16/bf16 with float32 master weights (fp16: dynamic loss scaling); "
                        "on NumPy for learning (emulated, slower), on CuPy the fast path")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the initial weights, data order, augmentation and dropout")
    g.add_argument("--out", default=None, help=f"output folder: checkpoint, history.json, curves.png (default "
                                               f"{d.out}; with --resume, the checkpoint's folder)")
    g.add_argument("--resume", default=None,
                   help="continue from this checkpoint with its training config; --epochs, --lr, --min-lr, "
                        "--eval-every, --max-bad-steps, --blas-threads, --backend, --bucket-mb, --no-overlap may "
                        "change, other flags that differ are refused")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="epochs between test evaluations")
    g.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                   help="stop after this many non-finite steps in a row")
    g.add_argument("--blas-threads", type=int, default=d.blas_threads,
                   help="BLAS threads (default 1: faster for these small matrices; 0: the BLAS default)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, a folder holding a checkpoint is refused)")
    g.add_argument("--accept-changed-data", action="store_true",
                   help="with --resume: continue even though the data split differs from the one the checkpoint "
                        "was trained on (images added, removed or changed)")
    g = p.add_argument_group("data parallel (mpiexec -n K python -m tinyvit train ...; README: Data parallel)")
    g.add_argument("--bucket-mb", type=float, default=d.bucket_mb,
                   help="send a bucket of gradients once it holds this many MiB (0: one per block)")
    g.add_argument("--no-overlap", dest="overlap", action="store_false", default=None,
                   help="all-reduce only after the whole backward (the baseline)")
    _defaults_shown(p, d)
    p.set_defaults(func=run_train)


def _defaults_shown(parser, d: TrainConfig) -> None:
    """Every training flag defaults to None on the command line, so ``run_train`` can tell the
    flags given from the defaults (``--resume`` refuses the ones it cannot apply); the real
    default goes into the help text."""
    names = {f.name for f in fields(TrainConfig)}
    for action in parser._actions:
        if action.dest not in names:
            continue
        default = getattr(d, action.dest)
        action.default = None
        if action.help and "default" not in action.help:
            shown = "the bundled digits" if action.dest == "data" else default
            action.help += f" (default: {shown})"
