"""`lvface-mm eval verify`: 10-fold verification on InsightFace `.bin` sets, several models in
one report.

    lvface-mm eval verify --bin lfw.bin --bin cfp_fp.bin --model lvface_b --checkpoint run/model.pt

Writes OUT/verify_report.json and OUT/roc_<set>.png (one curve per model).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .eval import add_model_arguments, cache_path, fail, load_models

if TYPE_CHECKING:
    from ..eval.verification import VerificationResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bin", action="append", required=True, type=Path, metavar="FILE",
                        help="verification .bin (lfw.bin, cfp_fp.bin, agedb_30.bin, ...); repeat for several")
    parser.add_argument("--far", action="append", type=float, default=None, metavar="FAR",
                        help="FARs for TAR@FAR on the pairs (default 1e-3 and 1e-4)")
    parser.add_argument("--folds", type=int, default=10, help="folds of the accuracy protocol (default 10)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..data.recordio import RecordIOError
    from ..data.verification_bin import UnsafePickleError
    from ..models import WeightsNotAvailableError

    try:
        return _run(args)
    except (FileNotFoundError, ValueError, RecordIOError, UnsafePickleError, WeightsNotAvailableError) as exc:
        return fail(str(exc))


def _run(args: argparse.Namespace) -> int:
    from ..data.verification_bin import load_verification_bin
    from ..eval.extract import extract_embeddings
    from ..eval.plots import plot_roc
    from ..eval.report import run_info, write_json
    from ..eval.verification import evaluate_verification
    from ..models.pretrained import sha256_of

    fars = tuple(args.far or (1e-3, 1e-4))
    if not all(0 < f <= 1 for f in fars) or args.folds < 2:
        raise ValueError(f"--far values must be in (0, 1] and --folds at least 2, got {list(fars)} and {args.folds}")
    sets = [load_verification_bin(p) for p in args.bin]
    names = _unique_names([s.name for s in sets])
    digests = [sha256_of(p)[:16] for p in args.bin]
    for vb, name in zip(sets, names):
        print(f"{name}: {vb.num_pairs} pairs ({int(vb.issame.sum())} genuine), {len(vb)} images, "
              f"{vb.encoded_bytes / 1e6:.1f} MB encoded")
    models = load_models(args)
    report: dict[str, object] = {
        "benchmark": "verification",
        "protocol": f"InsightFace {args.folds}-fold: flip-sum, L2-normalised, squared Euclidean distance, "
                    "thresholds 0-4 step 0.01 chosen on the other folds; TAR@FAR on all pairs (cosine)",
        "run": run_info(),
        "models": {m.label: {"source": m.source, "fingerprint": m.fingerprint} for m in models},
        "sets": {},
    }
    for vb, name, digest, path in zip(sets, names, digests, args.bin):
        curves = {}
        entry: dict[str, object] = {"bin": str(path), "sha256_16": digest, "pairs": vb.num_pairs, "results": {}}
        for m in models:
            emb = extract_embeddings(
                m.model, vb, batch_size=args.batch_size, flip=True,
                cache_path=cache_path(args, f"verify-{name}-{digest}-{m.fingerprint}"),
                cache_key=f"{m.fingerprint}|{digest}", num_workers=args.workers,
                progress=not args.quiet, desc=f"{name} / {m.label}",
            )
            result = evaluate_verification(emb.plain, emb.flipped, vb.issame, fars=fars, n_folds=args.folds)
            entry["results"][m.label] = result.to_dict()
            if result.roc is not None:
                curves[m.label] = result.roc
            _print_result(name, m.label, result)
        report["sets"][name] = entry
        if curves:
            title = f"{name} ({vb.num_pairs} pairs)"
            entry["roc_plot"] = str(plot_roc(curves, args.out / f"roc_{name}.png", title=title, mark_fars=fars))
        else:
            print(f"{name}: only one kind of pair (all genuine or all impostor): no ROC or TAR@FAR")
    path = write_json(args.out / "verify_report.json", report)
    print(f"report: {path}")
    return 0


def _print_result(name: str, label: str, result: VerificationResult) -> None:
    f, p = result.flip, result.plain
    tars = "  ".join(
        f"TAR@FAR={t.far:g} {100 * t.tar_closest:.2f}" + ("" if t.resolved else " (too few pairs)") for t in result.tar
    )
    print(f"[{name}] {label}: Accuracy-Flip {100 * f.mean:.2f} ± {100 * f.std:.2f}  Accuracy {100 * p.mean:.2f} ± "
          f"{100 * p.std:.2f}  threshold cos {f.cosine_threshold:.3f}  XNorm {result.xnorm:.2f}  {tars}")


def _unique_names(names: list[str]) -> list[str]:
    out = []
    for i, name in enumerate(names):
        out.append(name if names.count(name) == 1 else f"{name}-{i + 1}")
    return out
