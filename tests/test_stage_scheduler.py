"""CosineStageScheduler on synthetic cos^2 streams (one process; the cross-rank agreement is tested in
test_pco.py with 2 gloo processes)."""

from __future__ import annotations

import math

import pytest
import torch

from lvface_mm.losses import CosineStageScheduler


def _run(sched: CosineStageScheduler, values: list[float], start: int = 0) -> list[int]:
    return [sched.update(v, start + i) for i, v in enumerate(values)]


def test_switches_at_the_paper_thresholds_on_a_rising_stream() -> None:
    values = [0.005 * i for i in range(100)]  # 0.0 .. 0.495
    sched = CosineStageScheduler()
    stages = _run(sched, values)
    # first step with value >= 0.2 is 40, first with >= 0.35 is 70
    assert stages.index(2) == 40 and stages.index(3) == 70
    assert sched.switch_steps == {2: 40, 3: 70}
    assert stages == sorted(stages)


def test_never_goes_back_and_moves_one_stage_per_step() -> None:
    sched = CosineStageScheduler()
    assert _run(sched, [0.9, 0.9, 0.0, 0.0]) == [2, 3, 3, 3]
    sched = CosineStageScheduler()
    assert _run(sched, [0.25, 0.1, 0.0, 0.3, 0.36]) == [2, 2, 2, 2, 3]


def test_smoothing_window_ignores_a_single_spike() -> None:
    noisy = [0.1] * 10 + [0.5] + [0.1] * 10 + [0.22] * 10 + [0.4] * 10
    raw = _run(CosineStageScheduler(), noisy)
    assert raw.index(2) == 10  # the spike switches an unsmoothed scheduler
    sched = CosineStageScheduler(window=5)
    smoothed = _run(sched, noisy)
    means = [sum(noisy[max(0, i - 4) : i + 1]) / len(noisy[max(0, i - 4) : i + 1]) for i in range(len(noisy))]
    first2 = next(i for i, m in enumerate(means) if m >= 0.2 and i > 10 + 4)
    assert smoothed.index(2) == first2 == 25
    assert smoothed.index(3) == next(i for i, m in enumerate(means) if m >= 0.35) == 34
    assert sched.smoothed == pytest.approx(0.4)


def test_min_steps_per_stage() -> None:
    sched = CosineStageScheduler(min_steps_per_stage=5)
    stages = _run(sched, [0.5] * 12)
    assert stages.index(2) == 5 and stages.index(3) == 10


def test_manual_override_by_step_and_by_epoch() -> None:
    sched = CosineStageScheduler(override_steps=(3, 6))
    assert _run(sched, [0.9] * 2 + [0.0] * 6) == [1, 1, 1, 2, 2, 2, 3, 3]  # values are ignored
    sched = CosineStageScheduler(override_steps=(2, None))
    assert [sched.update(None, s) for s in range(5)] == [1, 1, 2, 2, 2]
    sched = CosineStageScheduler(override_epochs=(1, 2))
    assert [sched.update(0.0, step, epoch=step // 10) for step in range(0, 30, 5)] == [1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="override_epochs is set, so pass epoch="):
        sched.update(0.0, 31)
    # jumping past a whole stage still passes through stage 2 for one step
    sched = CosineStageScheduler(override_steps=(0, 0))
    assert _run(sched, [0.0, 0.0]) == [2, 3]


def test_state_dict_resume_gives_the_same_decisions() -> None:
    stream = [0.02 * i + 0.05 * math.sin(i) for i in range(30)]
    full = CosineStageScheduler(window=4)
    expected = _run(full, stream)
    first = CosineStageScheduler(window=4)
    _run(first, stream[:12])
    state = first.state_dict()
    resumed = CosineStageScheduler(window=4)
    resumed.load_state_dict(state)
    assert _run(resumed, stream[12:], start=12) == expected[12:]
    assert resumed.switch_steps == full.switch_steps
    with pytest.raises(ValueError, match="expected keys"):
        resumed.load_state_dict({"stage": 2})


def test_accepts_tensor_values_and_rejects_bad_input() -> None:
    sched = CosineStageScheduler()
    assert sched.update(torch.tensor(0.3, dtype=torch.float64), 0) == 2
    with pytest.raises(ValueError, match=r"cos_sq_mean must be a finite value in \[0, 1\], got nan"):
        sched.update(float("nan"), 1)
    with pytest.raises(ValueError, match="step went back from 0 to -1|step must be an int >= 0"):
        sched.update(0.1, -1)
    sched.update(0.1, 5)
    with pytest.raises(ValueError, match="step went back from 5 to 4"):
        sched.update(0.1, 4)
    with pytest.raises(ValueError, match="cos_sq_mean is required unless a manual override is set"):
        sched.update(None, 6)
    with pytest.raises(ValueError, match=r"delta2 \(0.1\) must be >= delta1 \(0.2\)"):
        CosineStageScheduler(0.2, 0.1)
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        CosineStageScheduler(window=0)
    with pytest.raises(ValueError, match="give override_steps or override_epochs, not both"):
        CosineStageScheduler(override_steps=(1, 2), override_epochs=(1, 2))
    with pytest.raises(ValueError, match=r"must not start stage 3 \(1\) before stage 2 \(5\)"):
        CosineStageScheduler(override_steps=(5, 1))
