"""`lvface-mm models`: every registered encoder with its size, cost, other names and weights status.

Weights status per format (PyTorch `.pt`, `.onnx`): `cached` (in the Hugging Face cache at the pinned
revision, usable offline), `not cached` (downloadable, e.g. with `hf download`), `none` (no official
weights). Nothing is downloaded or built: parameter counts and FLOPs come from the configs.

Exit status: 0, or 2 when the pattern matches no model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style name filter (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--cache-dir", type=Path, help="Hugging Face cache to look in (default: HF_HUB_CACHE)")


def _status(weights, cache_dir: Path | None, onnx: bool) -> str:
    from lvface_mm.models.pretrained import cached_weights_path

    if weights is None:
        return "none"
    return "cached" if cached_weights_path(weights, cache_dir=cache_dir, onnx=onnx) else "not cached"


def model_rows(pattern: str = "*", cache_dir: Path | None = None) -> list[dict[str, object]]:
    """One record per registered model matching `pattern`."""
    from lvface_mm.models import get_model_spec, list_models

    rows = []
    for name in list_models(pattern):
        spec = get_model_spec(name)
        c = spec.config
        rows.append({
            "name": name,
            "embed_dim": c.embed_dim,
            "depth": c.depth,
            "params": c.num_params,
            "gflops": round(c.flops_per_image / 1e9, 2),
            "feature_dim": c.feature_dim,
            "aliases": list(spec.aliases),
            "file": spec.weights.filename if spec.weights else None,
            "pt": _status(spec.weights, cache_dir, onnx=False),
            "onnx": _status(spec.weights, cache_dir, onnx=True),
            "description": spec.description,
        })
    return rows


def _table(rows: list[dict[str, object]]) -> str:
    header = ("model", "params", "GFLOPs", "width x depth", ".pt", ".onnx", "aliases (upstream names)", "hub file")
    lines = [
        (
            str(r["name"]),
            f"{r['params'] / 1e6:.2f} M",
            f"{r['gflops']:.2f}",
            f"{r['embed_dim']} x {r['depth']}",
            str(r["pt"]),
            str(r["onnx"]),
            ", ".join(r["aliases"]) or "-",
            str(r["file"] or "-"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*row).rstrip() for row in [header, *lines])


def run(args: argparse.Namespace) -> int:
    from lvface_mm.models.pretrained import HUB_REPO, HUB_REVISION

    rows = model_rows(args.pattern, args.cache_dir)
    if not rows:
        from lvface_mm.models import list_models

        print(f"error: no model matches {args.pattern!r}; models: {', '.join(list_models())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(_table(rows))
    print(f"\nweights: huggingface.co/{HUB_REPO} at revision {HUB_REVISION[:12]}; input: aligned 112x112 RGB "
          "crops scaled to [-1, 1]; output: 512-d raw embedding (L2-normalise for cosine).")
    return 0
