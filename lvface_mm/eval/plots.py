"""ROC plots (PNG) comparing several models on one benchmark.

Uses matplotlib's object API with the Agg canvas, so it never touches pyplot's global state or
needs a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .roc import RocCurve


def plot_roc(
    curves: Mapping[str, RocCurve],
    path: str | Path,
    title: str = "ROC",
    mark_fars: Sequence[float] = (),
    min_fpr: float | None = None,
) -> Path:
    """Write a log-FPR ROC plot with one line per model.

    Args:
        curves: label -> ROC curve.
        path: output PNG.
        title: plot title.
        mark_fars: vertical guide lines at these FARs.
        min_fpr: left edge of the x axis (default: the smallest non-zero FPR of any curve).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lowest = 1.0
    for label, curve in curves.items():
        keep = curve.fpr > 0  # log axis: FPR 0 cannot be drawn
        # The axis starts at the smallest measurable FPR (one impostor), even if the curve jumps past it.
        lowest = min(lowest, 1.0 / max(curve.num_neg, 1), float(curve.fpr[keep].min()) if keep.any() else 1.0)
        ax.plot(curve.fpr[keep], curve.tpr[keep], linewidth=1.5, label=label)
    left = min_fpr if min_fpr is not None else max(lowest, 1e-7)
    for far in mark_fars:
        if far >= left:
            ax.axvline(far, color="0.8", linewidth=0.8, linestyle="--", zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(left, 1.0)
    # Start the y axis a little below the lowest TPR shown, in steps of 0.1.
    bottom = float(np.floor(min(_tpr_at(c, left) for c in curves.values()) * 10) / 10)
    ax.set_ylim(min(max(bottom, 0.0), 0.9), 1.0 + 0.005)
    ax.set_xlabel("False accept rate (FAR)")
    ax.set_ylabel("True accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="major", linewidth=0.5, alpha=0.5)
    ax.legend(loc="lower right", fontsize="small")
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.93)  # fixed margins: tight_layout is slow
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def _tpr_at(curve: RocCurve, fpr: float) -> float:
    return float(np.interp(fpr, curve.fpr, curve.tpr))
