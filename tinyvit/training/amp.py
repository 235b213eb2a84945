"""Dynamic loss scaling for fp16 training, step for step as ``torch.amp.GradScaler``.

Derivation: docs/mixed_precision.md (the learners' tour: examples/11_lower_precision.py)

fp16 has 5 exponent bits: gradients below 2^-24 round to zero in the fp16 products of the
backward. Multiplying the loss by ``S`` multiplies every gradient by ``S`` (the backward is
linear in its upstream gradient), lifting them into fp16's range; dividing the float32
gradients by ``S`` before the optimiser step gives the same gradients back, so ``S``
cancels. Too large an ``S`` overflows to inf: that step is skipped (weights and optimiser
state untouched) and ``S`` halves. One training step::

    dlogits * S  -> model.backward -> grads (scaled)
    found_inf = any gradient not finite            (checked on the scaled gradients, as torch)
    grads = grads * (1 / S)                        (the reciprocal in float64, rounded to float32, as torch)
    found_inf ? skip the step : clip, optimiser step
    update(found_inf):
        found_inf:  S *= backoff_factor (0.5), clean = 0
        else:       clean += 1; clean == growth_interval (2000) ? S *= growth_factor (2), clean = 0

``S`` is held as a float32, as GradScaler's scale tensor is (each update multiplies in float64 and
rounds to float32, as its CPU kernel does), so the trajectories are equal
bit for bit (``tests/test_amp.py`` feeds both the same sequence of finite and non-finite steps).
bf16 has float32's exponent range and needs no scale (``enabled=False``: ``S = 1``, no skips).
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import array_module, to_host


class DynamicLossScaler:
    """``torch.amp.GradScaler``'s dynamic loss scale, written out.

    ``scale``: the current ``S`` (a Python float holding a float32 value); ``growth_tracker``:
    clean steps since the last change; ``skipped``: steps skipped for inf/NaN gradients so far;
    ``steps``: steps seen.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        for name, value, rule, ok in (("init_scale", init_scale, "> 0", lambda v: v > 0),
                                      ("growth_factor", growth_factor, "> 1", lambda v: v > 1.0),
                                      ("backoff_factor", backoff_factor, "in (0, 1)", lambda v: 0.0 < v < 1.0)):
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not ok(value)):
                raise ValueError(f"{name} must be a finite number {rule}, got {value!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
        self.enabled = bool(enabled)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.scale = float(np.float32(init_scale)) if self.enabled else 1.0
        self.growth_tracker = 0
        self.skipped = 0
        self.steps = 0

    def scale_grad(self, dloss):
        """``dL/dlogits -> S * dL/dlogits`` (the backward of ``S * loss``); unchanged when disabled."""
        return dloss * self.scale if self.enabled else dloss

    def unscale(self, grads: dict) -> tuple[dict, bool]:
        """Scaled gradients ``{key: array}`` -> (``{key: grad / S}`` in float32, found_inf).

        found_inf is True if any scaled gradient holds an inf or NaN (one host read for all).
        """
        if not self.enabled:
            return grads, False
        with np.errstate(divide="ignore", over="ignore"):  # a scale backed off to 0 gives inf, as in torch
            inv_scale = float(np.float32(np.float64(1.0) / np.float64(self.scale)))  # torch: double reciprocal

        arrays = list(grads.values())
        if not arrays:
            return {}, False
        xp = array_module(arrays[0])
        finite = xp.stack([xp.isfinite(g).all() for g in arrays]).all()
        found_inf = not bool(to_host(finite))
        return {k: g * inv_scale for k, g in grads.items()}, found_inf

    def update(self, found_inf: bool) -> None:
        """After a step: back off on inf/NaN (the step was skipped), grow after ``growth_interval`` clean steps."""
        self.steps += 1
        if not self.enabled:
            return
        if found_inf:
            self.skipped += 1
            self.scale = float(np.float32(self.scale * self.backoff_factor))  # the product in float64, as torch
            self.growth_tracker = 0
            return
        clean = self.growth_tracker + 1
        if clean == self.growth_interval:
            with np.errstate(over="ignore"):
                grown = np.float32(self.scale * self.growth_factor)
            if np.isfinite(grown):  # torch keeps the old scale if growing would overflow float32
                self.scale = float(grown)
            self.growth_tracker = 0
        else:
            self.growth_tracker = clean

    def state_dict(self) -> dict:
        """JSON-able state, for checkpoints (a resumed run continues the same trajectory)."""
        return {"enabled": self.enabled, "scale": self.scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "growth_tracker": self.growth_tracker, "skipped": self.skipped, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        try:
            new = DynamicLossScaler(float(state["scale"]) if state["enabled"] else 1.0, state["growth_factor"],
                                    state["backoff_factor"], state["growth_interval"], state["enabled"])
            tracker, skipped, steps = (int(state[k]) for k in ("growth_tracker", "skipped", "steps"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"loss scaler state is malformed ({exc}): {state!r}") from exc
        if not 0 <= tracker < new.growth_interval or skipped < 0 or steps < 0:
            raise ValueError(f"loss scaler state is out of range: {state!r}")
        new.growth_tracker, new.skipped, new.steps = tracker, skipped, steps
        self.__dict__.update(new.__dict__)
