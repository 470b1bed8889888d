"""Cosine Stage Scheduler: when PCO moves from stage 1 to 2 to 3.

LVFace switches stages when s(t) = mean_i cos^2(f(I_i), w_{y_i}) over the batch (the squared cosine
between each feature and its own class centre) crosses delta1 = 0.2 (-> stage 2) and delta2 = 0.35
(-> stage 3). `PartialFCOutput.cos_sq_mean` is that value for the global batch.

Guarantees:
    - every rank gets the same stage at the same step: the value is averaged over ranks and the
      decision is max-reduced, so `update` is a collective and must be called on every rank;
    - the stage never goes back, and moves at most one stage per call (stage 2 always runs at least
      one step, so the feature bank exists before it is frozen);
    - a manual schedule (`override_steps` or `override_epochs`) replaces the thresholds entirely.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import all_reduce_max, all_reduce_mean, collective_device, get_world_size

_Override = tuple[int | None, int | None]


def _check_override(value: object, name: str) -> _Override | None:
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in value)
    if not ok:
        raise ValueError(
            f"CosineStageScheduler: {name} must be (start of stage 2, start of stage 3) as ints >= 0 "
            f"(None = never), got {value!r}"
        )
    s2, s3 = value
    if s2 is not None and s3 is not None and s3 < s2:
        raise ValueError(f"CosineStageScheduler: {name} must not start stage 3 ({s3}) before stage 2 ({s2})")
    return (s2, s3)


class CosineStageScheduler:
    """Decide the PCO stage from the batch mean of cos^2(feature, own centre).

    Args:
        delta1: threshold of the smoothed value for stage 1 -> 2.
        delta2: threshold for stage 2 -> 3.
        override_steps: (first step of stage 2, first step of stage 3), None entries = never; replaces
            the thresholds.
        override_epochs: the same by epoch (pass `epoch=` to `update`).
        window: the thresholds compare the mean of the last `window` values (1 = no smoothing).
        min_steps_per_stage: threshold switches happen only after this many steps in the current
            stage (counted from the step the stage began).
        group: process group the decision is agreed on (default group, or none).
    """

    def __init__(
        self,
        delta1: float = 0.2,
        delta2: float = 0.35,
        override_steps: _Override | None = None,
        *,
        override_epochs: _Override | None = None,
        window: int = 1,
        min_steps_per_stage: int = 0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        for name, value in (("delta1", delta1), ("delta2", delta2)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"CosineStageScheduler: {name} must be in [0, 1] (a mean of cos^2), got {value!r}")
        if delta2 < delta1:
            raise ValueError(f"CosineStageScheduler: delta2 ({delta2}) must be >= delta1 ({delta1})")
        if override_steps is not None and override_epochs is not None:
            raise ValueError("CosineStageScheduler: give override_steps or override_epochs, not both")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"CosineStageScheduler: window must be an int >= 1, got {window!r}")
        if not isinstance(min_steps_per_stage, int) or isinstance(min_steps_per_stage, bool) or min_steps_per_stage < 0:
            raise ValueError(
                f"CosineStageScheduler: min_steps_per_stage must be an int >= 0, got {min_steps_per_stage!r}"
            )
        self.delta1 = float(delta1)
        self.delta2 = float(delta2)
        self.override_steps = _check_override(override_steps, "override_steps")
        self.override_epochs = _check_override(override_epochs, "override_epochs")
        self.window = window
        self.min_steps_per_stage = min_steps_per_stage
        self.group = group
        self._history: deque[float] = deque(maxlen=window)
        self._stage = 1
        self._stage_start_step = 0
        self._last_step: int | None = None
        self.switch_steps: dict[int, int] = {}  # stage -> step at which it began

    @property
    def stage(self) -> int:
        return self._stage

    @property
    def smoothed(self) -> float | None:
        """Mean of the last `window` agreed values, None before the first update."""
        return sum(self._history) / len(self._history) if self._history else None

    def _agree_value(self, value: float | Tensor | None) -> float | None:
        if value is None:
            if self.override_steps is None and self.override_epochs is None:
                raise ValueError("CosineStageScheduler.update: cos_sq_mean is required unless a manual override is set")
            return None
        device = value.device if isinstance(value, Tensor) else None
        if isinstance(value, Tensor):
            t = value.detach().reshape(()).double()
        else:
            t = torch.tensor(float(value), dtype=torch.float64)
        if get_world_size(self.group) > 1:
            t = all_reduce_mean(t.to(device or collective_device(self.group), torch.float64).clone(), self.group)
        v = float(t)
        if not math.isfinite(v) or not -1e-6 <= v <= 1.0 + 1e-6:
            raise ValueError(f"CosineStageScheduler.update: cos_sq_mean must be a finite value in [0, 1], got {v}")
        return v

    def _proposed_stage(self, step: int, epoch: int | None) -> int:
        if self.override_steps is not None or self.override_epochs is not None:
            by_step = self.override_steps is not None
            at, (s2, s3) = (step, self.override_steps) if by_step else (epoch, self.override_epochs)
            if at is None:
                raise ValueError("CosineStageScheduler.update: override_epochs is set, so pass epoch=")
            target = 3 if s3 is not None and at >= s3 else 2 if s2 is not None and at >= s2 else 1
            return max(self._stage, min(target, self._stage + 1))
        if self._stage == 3 or step - self._stage_start_step < self.min_steps_per_stage:
            return self._stage
        threshold = self.delta1 if self._stage == 1 else self.delta2
        return self._stage + 1 if self.smoothed is not None and self.smoothed >= threshold else self._stage

    def update(self, cos_sq_mean: float | Tensor | None, step: int, epoch: int | None = None) -> int:
        """Record this step's value and return the stage to train the step with. Collective.

        Args:
            cos_sq_mean: batch mean of cos^2(feature, own centre) (`PartialFCOutput.cos_sq_mean`); a
                float or 0-dim tensor; may be None when a manual override is set.
            step: the (optimizer) step counter; must not decrease.
            epoch: current epoch, needed with `override_epochs`.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"CosineStageScheduler.update: step must be an int >= 0, got {step!r}")
        if self._last_step is not None and step < self._last_step:
            raise ValueError(f"CosineStageScheduler.update: step went back from {self._last_step} to {step}")
        value = self._agree_value(cos_sq_mean)
        if value is not None:
            self._history.append(value)
        self._last_step = step
        proposed = self._proposed_stage(step, epoch)
        if get_world_size(self.group) > 1:  # identical inputs give identical decisions; make sure anyway
            agreed = torch.tensor([proposed], dtype=torch.int64, device=collective_device(self.group))
            proposed = int(all_reduce_max(agreed, self.group))
        if proposed > self._stage:
            self._stage = proposed
            self._stage_start_step = step
            self.switch_steps[proposed] = step
        return self._stage

    def state_dict(self) -> dict[str, object]:
        return {
            "stage": self._stage,
            "stage_start_step": self._stage_start_step,
            "last_step": self._last_step,
            "history": list(self._history),
            "switch_steps": dict(self.switch_steps),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        expected = {"stage", "stage_start_step", "last_step", "history", "switch_steps"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"CosineStageScheduler.load_state_dict: expected keys {sorted(expected)}, got {got}")
        if state["stage"] not in (1, 2, 3):
            raise ValueError(f"CosineStageScheduler.load_state_dict: stage must be 1, 2 or 3, got {state['stage']!r}")
        self._stage = int(state["stage"])
        self._stage_start_step = int(state["stage_start_step"])
        self._last_step = None if state["last_step"] is None else int(state["last_step"])
        self._history = deque((float(v) for v in state["history"]), maxlen=self.window)
        self.switch_steps = {int(k): int(v) for k, v in dict(state["switch_steps"]).items()}


__all__ = ["CosineStageScheduler"]
