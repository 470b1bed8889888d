"""The evaluation report: one JSON file, one markdown table and one bar plot, all modes side by side."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .metrics import SUMMARY_METRICS


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Rows = metrics (with an arrow for the better direction), columns = modes."""
    modes = list(results)
    lines = ["| metric | " + " | ".join(modes) + " |", "| --- | " + " | ".join("---:" for _ in modes) + " |"]
    for key, higher in SUMMARY_METRICS:
        if all(results[m].get(key) is None for m in modes):
            continue
        arrow = "↑" if higher else "↓"
        lines.append(f"| {key} {arrow} | " + " | ".join(_fmt(results[m].get(key)) for m in modes) + " |")
    counts = sorted({k for m in modes for k in results[m] if k.startswith("n_")})
    for key in counts:
        lines.append(f"| {key} | " + " | ".join(_fmt(results[m].get(key)) for m in modes) + " |")
    return "\n".join(lines) + "\n"


def verification_table(verification: Mapping[str, Mapping[str, float]]) -> str:
    """`{"before": {"TAR@FAR=1e-3": 0.9, ...}, "after": {...}}` as a markdown table."""
    stages = list(verification)
    keys = sorted({k for s in stages for k in verification[s]})
    lines = ["| metric | " + " | ".join(stages) + " |", "| --- | " + " | ".join("---:" for _ in stages) + " |"]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_fmt(verification[s].get(key)) for s in stages) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Grouped bars, one group per metric, one bar per mode. Uses the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    modes = list(results)
    keys = [k for k, _ in SUMMARY_METRICS if any(results[m].get(k) is not None for m in modes)]
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(keys) + 2), 4.0))
    for j, mode in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(keys))]
        ys = [results[mode].get(k) or 0.0 for k in keys]
        ax.bar(xs, ys, width=width, label=mode)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.set_title("identity-grounded VQA (hallucinated_name_rate: lower is better)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    *,
    verification: Mapping[str, Mapping[str, float]] | None = None,
    info: Mapping[str, Any] | None = None,
    plot: bool = True,
    retention: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write `report.json`, `report.md` and (optionally) `report.png` into `out_dir`.

    Args:
        results: mode ("token", "prompt", "plain", ...) -> metrics from `score_predictions`.
        verification: stage ("before", "after") -> TAR@FAR values of the encoder, when it was tuned.
        info: anything that identifies the run (model, dataset, date), copied into the JSON and
            the markdown header.
        retention: `lvface_mm.vqa.retention.text_retention`'s result: two more columns,
            "text-only" (the trained model) and "text-only base" (LoRA off), with their `text_qa_acc`
            on the same no-face questions, and the difference under the table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"info": dict(info or {}), "results": {m: dict(r) for m, r in results.items()}}
    if verification:
        payload["verification"] = {k: dict(v) for k, v in verification.items()}
    if retention:
        payload["text_retention"] = dict(retention)
        results = {
            **results,
            "text-only": {"text_qa_acc": retention["trained"], "n_text_qa": retention["n_text_qa"]},
            "text-only base": {"text_qa_acc": retention["base"], "n_text_qa": retention["n_text_qa"]},
        }
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    md = ["# Identity-grounded VQA report", ""]
    for key, value in (info or {}).items():
        md.append(f"- {key}: {value}")
    md += ["", markdown_table(results)]
    if retention:
        md += [
            f"Text-only retention (no face, no identity tokens; {retention['n_text_qa']} general questions): "
            f"text_qa_acc trained {_fmt(retention['trained'])}, base {_fmt(retention['base'])}, "
            f"difference {retention['difference']:+.3f}.",
            "",
        ]
    if verification:
        md += ["## Encoder verification", "", verification_table(verification)]
    if plot:
        paths["plot"] = plot_results(results, out / "report.png")
        md += ["![metrics](report.png)", ""]
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")
    return paths
