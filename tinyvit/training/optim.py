"""Optimisers, gradient clipping and the learning-rate schedule, written out by hand.

Parameters and gradients are the model's dicts (timm's keys); an optimiser keeps its
state in dicts with the same keys, so a checkpoint stores it by name. ``step`` reads
``params`` and ``grads`` and writes new arrays into ``params`` (every new value is
computed first, then all are stored: an exception part-way leaves nothing changed).

SGD (PyTorch's ``torch.optim.SGD``; weight decay is L2, added to the gradient)::

    g = grad + wd * p
    buf = g (first step) | momentum * buf + g
    p  -= lr * (g + momentum * buf  if nesterov else  buf)

AdamW (Loshchilov & Hutter; PyTorch's ``torch.optim.AdamW`` line for line; the decay is
decoupled from the gradient statistics)::

    p  *= 1 - lr * wd
    m   = beta1 * m + (1 - beta1) * grad
    v   = beta2 * v + (1 - beta2) * grad^2
    p  -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

No weight decay, as timm's ``param_groups_weight_decay``: 1-D parameters (LayerNorm
weights and biases, all biases) and the ``cls_token``, ``dist_token`` and ``pos_embed``, the
learned 2D RoPE frequencies ``rope.freqs`` (RoPE-ViT's ``no_weight_decay``) and, as Swin's
``no_weight_decay_keywords``, each block's ``attn.relative_position_bias_table``.

Everything runs on the parameters' own array module (NumPy or CuPy); hyper-parameters
are Python floats so float32 stays float32.
"""
from __future__ import annotations

import math

from ..backend import array_module, to_host

NO_DECAY_KEYS = ("cls_token", "dist_token", "pos_embed", "rope.freqs")


def decays(key: str, shape) -> bool:
    """timm's rule: weight decay for matrices and conv kernels, none for 1-D tensors,
    biases and the tokens / position embedding."""
    return (len(shape) > 1 and not key.endswith(".bias") and key not in NO_DECAY_KEYS
            and not key.endswith("relative_position_bias_table"))


def _check_float(name: str, value, low: float, high: float = math.inf, low_open=False, high_open=True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    v = float(value)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (math.isfinite(v) and ok_low and ok_high):  # NaN fails every comparison
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be a finite float in {lo}{low}, {high}{hi}, got {value!r}")
    return v


class _Optimizer:
    """Shared bookkeeping: the step count, per-key state, all-or-nothing commits."""

    name = ""
    slots: tuple = ()  # names of the per-parameter state arrays

    def __init__(self, lr: float, weight_decay: float):
        self.lr = _check_float("lr", lr, 0.0)
        self.weight_decay = _check_float("weight_decay", weight_decay, 0.0)
        self.t = 0  # steps taken
        self.state = {slot: {} for slot in self.slots}  # slot -> {key: array like the parameter}

    def _check(self, params: dict, grads: dict, lr):
        lr = self.lr if lr is None else _check_float("lr", lr, 0.0)
        if set(grads) != set(params):
            missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
            raise ValueError(f"grads must have the keys of params; missing {missing}, unexpected {extra} "
                             f"(run model.backward before the optimiser step)")
        for key, p in params.items():
            g = grads[key]
            if tuple(g.shape) != tuple(p.shape) or g.dtype != p.dtype:
                raise ValueError(f"grad {key!r} is {g.dtype}{tuple(g.shape)}, parameter is {p.dtype}{tuple(p.shape)}")
        return lr

    def step(self, params: dict, grads: dict, lr: float | None = None) -> None:
        """One update of every entry of ``params`` (in place in the dict) from ``grads``.

        ``lr`` overrides ``self.lr`` for this step (the schedule's value)."""
        lr = self._check(params, grads, lr)
        t = self.t + 1
        new_params, new_state = {}, {slot: {} for slot in self.slots}
        for key, p in params.items():
            old = {slot: self.state[slot].get(key) for slot in self.slots}
            new_params[key], slots = self._update(key, p, grads[key], old, lr, t)
            for slot, value in slots.items():
                new_state[slot][key] = value
        params.update(new_params)  # commit: nothing above changed any state
        for slot in self.slots:
            self.state[slot].update(new_state[slot])
        self.t = t

    # ---------------------------------------------------------------- checkpoints
    def hyper(self) -> dict:
        return {"name": self.name, "lr": self.lr, "weight_decay": self.weight_decay}

    def state_dict(self) -> tuple[dict, dict]:
        """``(arrays, meta)``: host copies of the state keyed ``"{slot}.{param key}"``, and the
        step count and hyper-parameters (JSON-able)."""
        arrays = {f"{slot}.{key}": to_host(v).copy() for slot in self.slots for key, v in self.state[slot].items()}
        return arrays, {**self.hyper(), "t": self.t}

    def load_state_dict(self, arrays: dict, meta: dict, params: dict) -> None:
        """All or nothing: the state must name this optimiser, only keys of ``params``, with
        their shapes. Arrays are moved to the parameters' backend and dtype."""
        problems = []
        if meta.get("name") != self.name:
            problems.append(f"optimiser state is for {meta.get('name')!r}, this optimiser is {self.name!r}")
        t = meta.get("t")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            problems.append(f"step count must be an int >= 0, got {t!r}")
        state = {slot: {} for slot in self.slots}
        for name, value in arrays.items():
            slot, _, key = name.partition(".")
            if slot not in state or key not in params:
                problems.append(f"unexpected state entry {name!r}")
            elif tuple(value.shape) != tuple(params[key].shape):
                problems.append(f"{name}: shape {tuple(value.shape)}, parameter is {tuple(params[key].shape)}")
            else:
                p = params[key]
                state[slot][key] = array_module(p).asarray(value, dtype=p.dtype)
        if problems:
            raise ValueError("optimiser state does not fit; nothing was loaded:\n  " + "\n  ".join(problems))
        self.state, self.t = state, t


class SGD(_Optimizer):
    """Stochastic gradient descent with momentum and Nesterov (``torch.optim.SGD``, dampening 0)."""

    name = "sgd"
    slots = ("momentum_buffer",)

    def __init__(self, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(lr, weight_decay)
        self.momentum = _check_float("momentum", momentum, 0.0, 1.0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = nesterov
        if self.momentum == 0.0:
            self.slots = ()
            self.state = {}

    def hyper(self) -> dict:
        return {**super().hyper(), "momentum": self.momentum, "nesterov": self.nesterov}

    def _update(self, key, p, grad, old, lr, t):
        d_p = grad + p * self.weight_decay if (self.weight_decay and decays(key, p.shape)) else grad
        if not self.momentum:
            return p - d_p * lr, {}
        buf = d_p if old["momentum_buffer"] is None else old["momentum_buffer"] * self.momentum + d_p
        direction = d_p + buf * self.momentum if self.nesterov else buf
        return p - direction * lr, {"momentum_buffer": buf}


class AdamW(_Optimizer):
    """Adam with decoupled weight decay (``torch.optim.AdamW``), no decay on timm's no-decay keys."""

    name = "adamw"
    slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.05):
        super().__init__(lr, weight_decay)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_check_float("betas[0]", betas[0], 0.0, 1.0), _check_float("betas[1]", betas[1], 0.0, 1.0))
        self.eps = _check_float("eps", eps, 0.0, low_open=True)

    def hyper(self) -> dict:
        return {**super().hyper(), "betas": list(self.betas), "eps": self.eps}

    def _update(self, key, p, grad, old, lr, t):
        xp = array_module(p)
        beta1, beta2 = self.betas
        if self.weight_decay and decays(key, p.shape):
            p = p * (1.0 - lr * self.weight_decay)  # decoupled decay, before the Adam step (as PyTorch)
        m = xp.zeros_like(p) if old["exp_avg"] is None else old["exp_avg"]
        v = xp.zeros_like(p) if old["exp_avg_sq"] is None else old["exp_avg_sq"]
        m = m * beta1 + grad * (1.0 - beta1)
        v = v * beta2 + grad * grad * (1.0 - beta2)
        step_size = lr / (1.0 - beta1 ** t)
        denom = xp.sqrt(v) / math.sqrt(1.0 - beta2 ** t) + self.eps
        return p - (m / denom) * step_size, {"exp_avg": m, "exp_avg_sq": v}


def build_optimizer(name: str, lr: float, weight_decay: float, **kw):
    """``"adamw"`` or ``"sgd"`` (momentum 0.9) / ``"nesterov"`` by name, for the command line."""
    if name == "adamw":
        return AdamW(lr=lr, weight_decay=weight_decay, **kw)
    if name in ("sgd", "nesterov"):
        return SGD(lr=lr, momentum=kw.get("momentum", 0.9), weight_decay=weight_decay, nesterov=name == "nesterov")
    raise ValueError(f"optimizer must be one of ('adamw', 'sgd', 'nesterov'), got {name!r}")


def grad_global_norm(grads: dict):
    """``sqrt(sum over every gradient of sum(g^2))``: a 0-d array on the gradients' backend."""
    total = None
    for g in grads.values():
        sq = (g * g).sum()
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError("grads is empty")
    return array_module(total).sqrt(total)


def clip_grad_norm(grads: dict, max_norm: float):
    """Global-norm clipping, as ``torch.nn.utils.clip_grad_norm_``.

    ``-> (clipped grads (a new dict), total norm before clipping (0-d array))``. Every
    gradient is scaled by ``min(1, max_norm / (norm + 1e-6))``; on the device, no sync.
    """
    max_norm = _check_float("max_norm", max_norm, 0.0, low_open=True)
    norm = grad_global_norm(grads)
    coef = array_module(norm).minimum(max_norm / (norm + 1e-6), 1.0)  # 0-d, the gradients' dtype
    return {k: g * coef for k, g in grads.items()}, norm


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate for 0-based ``step``: linear warm-up to ``base_lr`` over ``warmup_steps``
    (``base_lr * (step + 1) / warmup_steps``), then a half cosine from ``base_lr`` down to
    ``min_lr`` at ``total_steps``. A Python float (the same on every backend)."""
    if warmup_steps < 0 or total_steps <= 0 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps > 0, "
                         f"got warmup_steps={warmup_steps}, total_steps={total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
