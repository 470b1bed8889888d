"""Does bf16 change what the encoder says? Cosine between bf16 and fp32 embeddings and verification
accuracy with each, on a trained encoder, for the `backend="auto"` bf16 decision.

    python benchmarks/bench_bf16.py --quick    # tiny encoder on 64 identities, 4 epochs (64 steps); T on 8 crops
    python benchmarks/bench_bf16.py            # the shipped tiny config (6 epochs, 300 steps); T on 32 crops

Encoders:
    tiny, trained   lvface_tiny (32 wide, 2 deep, 2 heads) trained with
                    training/configs/encoder/tiny_synthetic.yaml (PCO on 200 synthetic identities),
                    then evaluated on its 600 held-out pairs of 50 unseen identities.
    lvface_t, init  LVFace-T in the official key layout with random initial weights (no trained
                    weights are available offline): numerical behaviour of the full-size architecture
                    only; accuracy means nothing there, so only the cosine is reported.

bf16 means the whole model cast to bfloat16 (`prepare_for_inference(model, dtype="bf16")`, what the
encoder benchmark timed), inputs cast too; fp32 is the default path. Cosines are between the
L2-normalised embeddings of the same crop. On a CPU without native bf16 (as here) PyTorch runs bf16
through a slow fallback kernel, but the arithmetic (bf16 storage, fp32 accumulation) is what
AVX512-BF16 and AMX kernels do, so the numbers carry over; small differences in accumulation order
remain.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _results import write_section  # noqa: E402

from lvface_mm.eval import evaluate_verification, extract_embeddings  # noqa: E402
from lvface_mm.models import create_model, prepare_for_inference  # noqa: E402
from lvface_mm.models.inference import bf16_auto_decision, cpu_has_native_bf16  # noqa: E402

TINY = ROOT / "training" / "configs" / "encoder" / "tiny_synthetic.yaml"


def train_tiny(run_dir: Path, quick: bool, seed: int) -> list[float]:
    """Train the tiny encoder into `run_dir`; returns the held-out accuracies logged during training."""
    from training.encoder import main

    args = ["--config", str(TINY), f"--output_dir={run_dir}", "--data.num_workers=0", f"--loop.seed={seed}",
            "--loop.progress_bar=false", "--loop.tensorboard=false"]
    if quick:  # the setting of tests/test_training_learns.py: 64 identities, 4 epochs = 64 steps
        args += ["--data.synthetic.num_identities=64", "--loop.epochs=4", "--eval.every_steps=0"]
    if main(args) != 0:
        raise RuntimeError(f"training failed: {' '.join(args)}")
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["synthetic_heldout/acc"] for r in records if r["kind"] == "eval"]


def load_trained(run_dir: Path) -> torch.nn.Module:
    if (run_dir / "encoder" / "config.json").is_file():  # the export layout (save_pretrained_encoder)
        return create_model(run_dir / "encoder")
    return create_model("lvface_tiny", num_heads=2, checkpoint_path=run_dir / "model.pt")


def heldout_pairs(num_pairs: int, identities: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Pairs of identities the encoder never saw (those after the 200 training identities of the config)."""
    from training.config import load_config
    from training.encoder import EncoderRunConfig, build_pair_sets

    overrides = [f"--data.synthetic.num_pairs={num_pairs}", f"--data.synthetic.heldout_identities={identities}"]
    pairs = build_pair_sets(load_config(EncoderRunConfig, str(TINY), overrides))[0]
    return pairs.images, pairs.issame


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def embed(model: torch.nn.Module, images, dtype: str) -> tuple[np.ndarray, np.ndarray, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the "no native bf16 here" warning: known
        prepare_for_inference(model, dtype=dtype)
    start = time.perf_counter()
    emb = extract_embeddings(model, images, batch_size=64, progress=False)
    return emb.plain, emb.flipped, time.perf_counter() - start


def compare(model: torch.nn.Module, images, issame: np.ndarray | None) -> dict[str, object]:
    plain32, flip32, t32 = embed(model, images, "fp32")
    plain16, flip16, t16 = embed(model, images, "bf16")
    cos = cosines(plain32, plain16)
    cos_flip = cosines(plain32 + flip32, plain16 + flip16)
    row: dict[str, object] = {
        "images": len(plain32), "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
        "cos_flip_min": float(cos_flip.min()), "seconds_fp32": t32, "seconds_bf16": t16,
    }
    if issame is not None:
        r32 = evaluate_verification(plain32, flip32, issame)
        r16 = evaluate_verification(plain16, flip16, issame)
        # Pairs on the other side of fp32's own threshold once the embeddings are bf16.
        s32 = cosines((plain32 + flip32)[0::2], (plain32 + flip32)[1::2])
        s16 = cosines((plain16 + flip16)[0::2], (plain16 + flip16)[1::2])
        threshold = r32.flip.cosine_threshold
        changed = (s32 >= threshold) != (s16 >= threshold)
        now_right = (s16 >= threshold) == np.asarray(issame, bool)
        row.update(acc_fp32=r32.flip.mean, acc_bf16=r16.flip.mean, pairs=len(issame),
                   flipped_decisions=int(changed.sum()), became_right=int((changed & now_right).sum()),
                   max_score_change=float(np.abs(s32 - s16).max()))
    return row


def official_layout_crops(n: int) -> list[np.ndarray]:
    """Aligned crops of real faces (the committed portraits, flipped and shifted) and synthetic ones."""
    from lvface_mm.data.synthetic import SyntheticFaces, SyntheticFacesConfig
    from lvface_mm.faces import FaceEmbedder
    from tests._faces_fixtures import PORTRAITS, portrait_path

    crops = []
    try:
        embedder = FaceEmbedder.from_tiny(backend="torch")
        for name in PORTRAITS:
            crop = embedder.embed_image(portrait_path(name)).main_face().crop
            crops += [crop, crop[:, ::-1].copy()]
    except ImportError:  # no dlib: synthetic crops only
        pass
    synthetic = SyntheticFaces(SyntheticFacesConfig(num_identities=max(n, 1), images_per_identity=1))
    crops += [synthetic[i][0].permute(1, 2, 0).numpy() for i in range(n)]
    return crops[:n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 64-step training run instead of 300; T on 8 crops")
    parser.add_argument("--run-dir", type=Path, help="reuse (or keep) this training run instead of a temp folder")
    parser.add_argument("--seed", type=int, default=0, help="training seed (--loop.seed)")
    parser.add_argument("--pairs", type=int, default=600, help="held-out verification pairs (multiple of 20)")
    parser.add_argument("--heldout-identities", type=int, default=50, help="unseen identities the pairs are drawn from")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "encoder.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    t_crops = 8 if args.quick else 32
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or Path(tmp) / "run"
        if not (run_dir / "model.pt").is_file():
            logged = train_tiny(run_dir, args.quick, args.seed)
        else:
            logged = []
        images, issame = heldout_pairs(args.pairs, args.heldout_identities)
        label = f"lvface_tiny, trained seed {args.seed} ({len(issame)} pairs of {args.heldout_identities} unseen ids)"
        rows = {label: compare(load_trained(run_dir), images, issame)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        official = create_model("lvface_t")
    rows["lvface_t, random init, official layout (portrait + synthetic crops)"] = compare(
        official, official_layout_crops(t_crops), None)

    trained = next(iter(rows.values()))
    decision = bf16_auto_decision(cos_min=trained["cos_min"], acc_fp32=trained["acc_fp32"],
                                  acc_bf16=trained["acc_bf16"])
    lines = [
        f"### bf16 against fp32: embeddings and verification ({datetime.date.today()})",
        "",
        f"Command: `python benchmarks/bench_bf16.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, native bf16: "
        f"{cpu_has_native_bf16()}; 1-min load {load_before:.1f}  ",
        "Training: tiny_synthetic.yaml" + (" with 64 identities, 4 epochs (64 steps)" if args.quick else " (300 steps)")
        + (f"; held-out accuracy logged during training {', '.join(f'{a:.3f}' for a in logged)}" if logged else ""),
        "",
        "| encoder | crops | cos min | cos mean | cos min (flip-sum) | acc fp32 | acc bf16 | pair decisions changed "
        "| largest pair-score change | s fp32 | s bf16 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        acc = (f"{r['acc_fp32']:.4f} | {r['acc_bf16']:.4f} | {r['flipped_decisions']} of {r['pairs']} "
               f"({r['became_right']} now right) | "
               f"{r['max_score_change']:.4f}") if "acc_fp32" in r else "- | - | - | -"
        lines.append(f"| {name} | {r['images']} | {r['cos_min']:.5f} | {r['cos_mean']:.5f} | {r['cos_flip_min']:.5f} | "
                     f"{acc} | {r['seconds_fp32']:.1f} | {r['seconds_bf16']:.1f} |")
    lines += [
        "",
        f"Decision rule (`lvface_mm.models.inference.bf16_auto_decision`): bf16 for `backend=\"auto\"` only if the "
        "trained encoder keeps every cosine >= 0.999 and the 10-fold accuracy changes by at most 0.1 point. "
        f"Here: **{'bf16' if decision else 'fp32'}** "
        f"(cos min {trained['cos_min']:.5f}, accuracy {trained['acc_fp32']:.4f} -> {trained['acc_bf16']:.4f}).",
        "Seconds are wall time of the fp32 and bf16 extraction on this CPU (no native bf16: the bf16 column "
        "is the slow fallback, not what an AVX512-BF16 CPU does).",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_write:
        write_section(args.output, "bench_bf16", report)
        print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
