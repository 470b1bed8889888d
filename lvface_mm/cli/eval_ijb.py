"""`lvface-mm eval ijb`: IJB-B / IJB-C 1:1 verification and 1:N identification.

    lvface-mm eval ijb --root IJB --target IJBC --model lvface_b

Writes OUT/ijb_<target>_report.json and OUT/roc_<target>.png. Embeddings are cached per model
under OUT/cache; an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .eval import add_model_arguments, cache_path, fail, load_models

if TYPE_CHECKING:
    from ..eval.ijb import IJBResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True,
                        help="folder holding <TARGET>/meta and <TARGET>/loose_crop (or the target folder itself)")
    parser.add_argument("--target", default="IJBC", type=str.upper, choices=("IJBB", "IJBC"))
    parser.add_argument("--no-flip", action="store_true", help="do not add the flipped-image embedding")
    parser.add_argument("--no-detector-score", action="store_true", help="do not weight images by detector score")
    parser.add_argument("--normalize-images", action="store_true",
                        help="L2-normalise image features before pooling (InsightFace 'N' mode; off in papers)")
    parser.add_argument("--no-1n", action="store_true", help="skip 1:N identification even if its CSVs exist")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..models import WeightsNotAvailableError

    try:
        return _run(args)
    except (FileNotFoundError, ValueError, WeightsNotAvailableError) as exc:
        return fail(str(exc))


def _run(args: argparse.Namespace) -> int:
    import hashlib

    from ..data.ijb import PUBLISHED_COUNTS, IJBAlignedFaces, load_ijb
    from ..eval.extract import extract_embeddings
    from ..eval.ijb import IJB_FARS, evaluate_ijb
    from ..eval.plots import plot_roc
    from ..eval.report import run_info, write_json

    protocol = load_ijb(args.root, args.target, one_to_n=not args.no_1n)
    counts = protocol.counts()
    _print_counts(args.target, counts, PUBLISHED_COUNTS.get(args.target, {}))
    digest = hashlib.sha256()
    for array in (protocol.image_names.astype(str), protocol.landmarks):
        digest.update(array.tobytes())
    data_key = digest.hexdigest()[:16]
    models = load_models(args)
    faces = IJBAlignedFaces(protocol)
    mode = {
        "flip_sum": not args.no_flip,
        "detector_score_weighting": not args.no_detector_score,
        "normalize_images": args.normalize_images,
    }
    report: dict[str, object] = {
        "benchmark": args.target,
        "root": str(args.root),
        "mode": mode,
        "tar_conventions": "tar_closest: TPR at the ROC point with FPR closest to the target, highest TPR on ties "
                           "(InsightFace eval_ijbc.py, as papers report); "
                           "tar_interpolated: ROC upper envelope interpolated at the target",
        "run": run_info(),
        "counts": counts,
        "models": {},
    }
    curves = {}
    for m in models:
        # Always embed both views: the cache then serves every scoring mode (--no-flip included).
        emb = extract_embeddings(
            m.model, faces, batch_size=args.batch_size, flip=True,
            cache_path=cache_path(args, f"ijb-{args.target}-{data_key}-{m.fingerprint}"),
            cache_key=f"{m.fingerprint}|{data_key}", num_workers=args.workers,
            progress=not args.quiet, desc=f"{args.target} / {m.label}",
        )
        result = evaluate_ijb(
            protocol, emb.plain, None if args.no_flip else emb.flipped,
            detector_weighting=not args.no_detector_score, normalize_images=args.normalize_images, fars=IJB_FARS,
        )
        report["models"][m.label] = {"source": m.source, "fingerprint": m.fingerprint, **result.to_dict()}
        curves[m.label] = result.roc
        _print_result(args.target, m.label, result)
    plot = plot_roc(curves, args.out / f"roc_{args.target}.png", title=f"{args.target} 1:1", mark_fars=IJB_FARS)
    report["roc_plot"] = str(plot)
    path = write_json(args.out / f"ijb_{args.target}_report.json", report)
    print(f"report: {path}")
    return 0


def _print_counts(target: str, counts: dict[str, int], published: dict[str, int]) -> None:
    print(f"{target} protocol loaded:")
    for key, value in counts.items():
        full = published.get(key)
        note = "" if full is None else ("  (full protocol)" if full == value else f"  (full protocol: {full:,})")
        print(f"  {key:>24}: {value:,}{note}")


def _print_result(target: str, label: str, result: IJBResult) -> None:
    print(f"[{target}] {label}: 1:1 TAR@FAR   closest   interpolated")
    for t in result.tar:
        flag = "" if t.resolved else "   (below 1/impostors: not measurable)"
        print(f"    {t.far:>8.0e}   {100 * t.tar_closest:7.2f}   {100 * t.tar_interpolated:7.2f}{flag}")
    if result.identification is not None:
        ident = result.identification
        ranks = "  ".join(f"rank-{k} {100 * v:.2f}" for k, v in ident.rank_accuracy.items())
        tpir = "  ".join(f"TPIR@FPIR={f:g} {100 * v:.2f}" for f, v in ident.tpir.items())
        print(f"    1:N {ranks}  {tpir}")
