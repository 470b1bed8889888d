"""Peak memory of a verification run: lazy `.bin` decoding (ours) vs eager float32 tensors
(InsightFace's `load_bin`), same file, same model, same batches, in one run.

    python benchmarks/bench_verification_memory.py --quick        # 1,200 pairs
    python benchmarks/bench_verification_memory.py --repeats 1    # 12,000 pairs (24,000 images)

Each approach runs in its own fresh subprocess, so peak RSS (the kernel's high-water mark,
VmHWM) belongs to that approach alone; the table reports the peak and the peak above the
process's baseline after imports and model creation (what the data path adds). tracemalloc's
peak is shown too, but it only sees Python/numpy allocations, not torch's tensors, so for the
eager approach it misses the big float32 arrays: RSS is the honest number.

    eager  decode every image up front into two float32 tensors (original, flipped) of shape
           (2N, 3, 112, 112), then embed them batch by batch (what arcface_torch does)
    lazy   `load_verification_bin` keeps images encoded; `extract_embeddings` decodes one batch
           at a time; then `evaluate_verification`

Both use `lvface_tiny` with random weights: the model is the same for both approaches and its
size does not change the data path's memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _rss_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def build_bin(path: Path, pairs: int) -> None:
    """2 * pairs distinct face-sized JPEGs (~9 KB each): every image is its own bytes object, as in a
    real .bin (pickle would store repeated objects once and flatter the lazy loader)."""
    import cv2

    from lvface_mm.data import write_verification_bin

    rng = np.random.default_rng(0)

    def jpeg(pattern_seed: int) -> bytes:
        low = np.random.default_rng(pattern_seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = cv2.resize(low, (112, 112), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 12, (112, 112, 3))
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        return cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()

    # Genuine pairs: one pattern, two noise draws; impostor pairs: two patterns.
    items = [(jpeg(i), jpeg(i if i % 2 == 0 else pairs + i), i % 2 == 0) for i in range(pairs)]
    write_verification_bin(path, items)


def _model():
    import torch

    from lvface_mm.models import create_model

    torch.manual_seed(0)
    return create_model("lvface_tiny").eval()


def run_lazy(path: Path, batch_size: int) -> dict[str, float]:
    from lvface_mm.data import load_verification_bin
    from lvface_mm.eval import evaluate_verification, extract_embeddings

    vb = load_verification_bin(path)
    emb = extract_embeddings(_model_cached, vb, batch_size=batch_size, flip=True, progress=False)
    result = evaluate_verification(emb.plain, emb.flipped, vb.issame)
    return {"accuracy_flip": result.flip.mean}


def run_eager(path: Path, batch_size: int) -> dict[str, float]:
    import pickle

    import cv2
    import torch

    from lvface_mm.eval import evaluate_verification

    with open(path, "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")  # the reference's loader (our own file, trusted)
    data = [torch.empty((len(bins), 3, 112, 112)) for _ in range(2)]  # float32, 0..255
    for i, b in enumerate(bins):
        img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        chw = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        data[0][i] = chw
        data[1][i] = torch.flip(chw, dims=[2])
    embeddings = []
    with torch.inference_mode():
        for view in data:
            out = []
            for lo in range(0, len(view), batch_size):
                x = (view[lo : lo + batch_size] / 255 - 0.5) / 0.5
                out.append(_model_cached(x).numpy())
            embeddings.append(np.concatenate(out))
    result = evaluate_verification(embeddings[0], embeddings[1], np.asarray(issame))
    return {"accuracy_flip": result.flip.mean}


_model_cached = None


def child(mode: str, path: Path, batch_size: int) -> None:
    global _model_cached
    import lvface_mm.data
    import lvface_mm.eval  # noqa: F401  (imports count as baseline)

    _model_cached = _model()
    baseline = _rss_peak_mb()
    tracemalloc.start()
    t = time.perf_counter()
    out = (run_lazy if mode == "lazy" else run_eager)(path, batch_size)
    seconds = time.perf_counter() - t
    _, py_peak = tracemalloc.get_traced_memory()
    print(json.dumps({
        "baseline_mb": baseline,
        "peak_mb": _rss_peak_mb(),
        "tracemalloc_peak_mb": py_peak / 2**20,
        "seconds": seconds,
        **out,
    }))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,200 pairs")
    parser.add_argument("--pairs", type=int, default=12_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", choices=("lazy", "eager"), help=argparse.SUPPRESS)
    parser.add_argument("--bin", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.bin, args.batch_size)
        return 0
    if args.quick:
        args.pairs = 1_200
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.bin"
        build_bin(path, args.pairs)
        runs: dict[str, list[dict[str, float]]] = {"eager": [], "lazy": []}
        for _ in range(args.repeats):
            for mode in runs:
                cmd = [sys.executable, __file__, "--child", mode, "--bin", str(path),
                       "--batch-size", str(args.batch_size)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[mode].append(json.loads(out.strip().splitlines()[-1]))
        size_mb = path.stat().st_size / 2**20
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    print(f"{args.pairs:,} pairs ({2 * args.pairs:,} images), .bin {size_mb:.1f} MiB; median of {args.repeats} runs; "
          f"batch {args.batch_size}; MiB")
    print("| approach | peak RSS | above baseline | tracemalloc peak | seconds | Accuracy-Flip |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("eager", "lazy"):
        m = med[mode]
        print(f"| {mode} | {m['peak_mb']:,.0f} | {m['peak_mb'] - m['baseline_mb']:,.0f} | "
              f"{m['tracemalloc_peak_mb']:,.0f} | {m['seconds']:.1f} | {100 * m['accuracy_flip']:.2f} |")
    eager, lazy = med["eager"], med["lazy"]
    print(f"lazy / eager: peak RSS {lazy['peak_mb'] / eager['peak_mb']:.3f}, above baseline "
          f"{(lazy['peak_mb'] - lazy['baseline_mb']) / (eager['peak_mb'] - eager['baseline_mb']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
