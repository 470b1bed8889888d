"""`lvface-mm export-onnx`: write an encoder as ONNX in the official layout (input `data`,
(N, 3, 112, 112) float32 in [-1, 1], dynamic batch, (N, 512) raw embedding, fp32 weights).

Weights: `--checkpoint PATH` if given; otherwise the official weights of `--model` (from the Hugging
Face cache or downloaded); models without official weights (and `--random-init`) get random weights
from `--seed`. After writing, the file is run with onnxruntime and compared with PyTorch.

Exit status: 0 written (and verified), 1 the ONNX output disagrees with PyTorch, 2 bad input or
weights not available (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model name or upstream alias, e.g. lvface_b")
    parser.add_argument("--output", "-o", type=Path, required=True, help="the .onnx file to write")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, help="local .pt/.safetensors checkpoint (default: official)")
    weights.add_argument("--random-init", action="store_true", help="random weights (for testing the toolchain)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch of the tracing input (axis is dynamic)")
    parser.add_argument("--cache-dir", type=Path, help="Hugging Face cache for official weights")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs PyTorch check")


def run(args: argparse.Namespace) -> int:
    import torch

    from lvface_mm.models import WeightsNotAvailableError, create_model, get_model_spec

    try:
        spec = get_model_spec(args.model)
        random_init = args.random_init or (args.checkpoint is None and spec.weights is None)
        if random_init:
            print(f"note: {spec.name} with random weights (seed {args.seed})", file=sys.stderr)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = create_model(
                spec.name,
                pretrained=not random_init and args.checkpoint is None,
                checkpoint_path=args.checkpoint,
                cache_dir=args.cache_dir,
            )
        from lvface_mm.models.onnx import export_onnx

        path = export_onnx(model, args.output, opset=args.opset, batch_size=args.batch_size)
    except (ValueError, OSError, ImportError, WeightsNotAvailableError) as exc:
        from ._common import cli_terms

        print(f"error: {cli_terms(str(exc))}", file=sys.stderr)
        return 2
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({size_mb:.1f} MB): input 'data' (N, 3, 112, 112) in [-1, 1] -> (N, 512) raw embedding")
    if args.no_verify:
        return 0
    return _verify(model, path)


def _verify(model, path: Path) -> int:
    import numpy as np
    import torch

    from lvface_mm.models.onnx import OnnxEncoder

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 112, 112, generator=generator) * 2 - 1  # (3, 3, 112, 112) in [-1, 1]
    with torch.inference_mode():
        expected = model.eval().float()(x).numpy()
    got = OnnxEncoder(path)(x)
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(got - expected).max())
    ok = diff <= 1e-4 * scale
    verdict = "ok" if ok else "MISMATCH"
    print(f"onnxruntime vs PyTorch: max abs diff {diff:.2e} on outputs up to {scale:.2f} -> {verdict}")
    return 0 if ok else 1
