"""`lvface-mm eval BENCHMARK ...`: one subcommand per benchmark, dispatched like the top level.

    lvface-mm eval verify --bin lfw.bin --model lvface_b         10-fold accuracy, TAR@FAR, ROC
    lvface-mm eval ijb --root IJB --target IJBC --model lvface_b  IJB-B/C 1:1 and 1:N
    lvface-mm eval vqa ...                                         identity-grounded VQA

This module also holds the model options the face benchmarks share (`--model`, `--checkpoint`,
`--random-weights`, device, batch size, output and cache folders).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..models import FaceViT

# name -> (module, one-line help); a module missing from this checkout is skipped.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("lvface_mm.cli.eval_verify", "10-fold verification on InsightFace .bin sets (LFW, CFP-FP, AgeDB)"),
    "ijb": ("lvface_mm.cli.eval_ijb", "IJB-B / IJB-C 1:1 verification and 1:N identification"),
    "vqa": ("lvface_mm.cli.eval_vqa", "identity-grounded VQA accuracy of a VLM with the identity adapter"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real missing dependency inside the module
                raise
            continue  # benchmark not built in this checkout
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_eval_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._eval_run(args) or 0)


# -- options shared by the face benchmarks ----------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models (repeat --model/--checkpoint to compare several in one report and plot)")
    g.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="registered model with its official weights, e.g. lvface_b")
    g.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
                   help="local checkpoint; the variant is read from its shapes unless NAME= is given")
    g.add_argument("--random-weights", action="store_true",
                   help="build --model variants with random weights (seed 0), no download: for smoke runs such as "
                        "--model lvface_tiny")
    r = parser.add_argument_group("running")
    r.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model precision (default float32, the published protocol)")
    r.add_argument("--batch-size", type=_positive_int, default=128)
    r.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding/aligning images")
    r.add_argument("--out", type=Path, default=Path("eval_out"), help="folder for the JSON report and ROC plot")
    r.add_argument("--cache-dir", type=Path, default=None,
                   help="embedding cache (default: OUT/cache); reruns and interrupted runs resume from it")
    r.add_argument("--no-cache", action="store_true", help="keep embeddings in memory only")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


@dataclass(frozen=True)
class EvalModel:
    """A model to evaluate and how to name it in reports."""

    label: str
    source: str
    model: FaceViT
    fingerprint: str


def load_models(args: argparse.Namespace) -> list[EvalModel]:
    """Build every --model / --checkpoint on the chosen device and dtype.

    Raises:
        ValueError: no model given, an unknown name, or a checkpoint whose variant cannot be told.
    """
    import torch

    from ..eval.extract import model_fingerprint
    from ..models import create_model, guess_variant, list_models, read_state_dict, resolve_dtype

    if not args.model and not args.checkpoint:
        raise ValueError("give at least one --model NAME or --checkpoint PATH")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device)
    built: list[tuple[str, str, object]] = []
    for name in args.model:
        if args.random_weights:
            torch.manual_seed(0)  # reproducible random weights, so caches and numbers repeat
            built.append((name, f"{name} (random weights)", create_model(name, pretrained=False)))
        else:
            if name not in list_models(pretrained=True) and name in list_models():
                raise ValueError(f"model {name!r} has no official weights; add --random-weights for a smoke run")
            built.append((name, f"{name} (official weights)", create_model(name, pretrained=True)))
    for spec in args.checkpoint:
        variant, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        if not variant:
            variant = guess_variant(read_state_dict(path))
            if variant is None:
                raise ValueError(f"{path}: cannot tell which model variant this checkpoint is; pass NAME={path}")
        built.append((Path(path).stem, f"{variant} from {path}", create_model(variant, checkpoint_path=path)))
    labels = _unique_labels([label for label, _, _ in built])
    models = []
    for label, (_, source, model) in zip(labels, built):
        model = model.to(device=device, dtype=dtype).eval()
        models.append(EvalModel(label, source, model, model_fingerprint(model)))
    return models


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label}#{seen[label]}")
    return out


def cache_path(args: argparse.Namespace, stem: str) -> Path | None:
    if args.no_cache:
        return None
    return (args.cache_dir or args.out / "cache") / f"{stem}.npy"


def fail(message: str) -> int:
    from ._common import cli_terms

    print(f"error: {cli_terms(message)}", file=sys.stderr)
    return 2
