"""Encoder throughput (images/s) on this CPU: our PyTorch path vs onnxruntime on the same weights vs
an eager re-implementation of the official forward, side by side in one run, plus the CPU's
measured matmul peak so each number can be read as a fraction of what the hardware does.

    python benchmarks/bench_encoder.py --quick               # T and B at batch 1 and 64, 3 repeats
    python benchmarks/bench_encoder.py                       # 5 repeats, longer timed windows
    python benchmarks/bench_encoder.py --quick --threads 1   # one intra-op thread for every backend

Backends (same random weights; speed does not depend on their values):
    default      the encoder FaceEmbedder (and the CLI) picks with backend="auto" on this machine:
                 for an fp32 FaceViT on the CPU, onnxruntime on a cached export of the weights,
                 called with torch crops as the pipeline does.
    ours         create_model + prepare_for_inference (fp32) under torch.inference_mode: fused SDPA
                 attention, in-place ReLU6.
    ours-bf16    the same in bf16; only where the CPU has native bf16 matmuls (AVX512-BF16/AMX), or
                 with --bf16 to force it.
    onnxruntime  export_onnx of the same model (the official converter's graph), CPU provider, all
                 graph optimisations, the same number of intra-op threads.
    eager-ref    lvface_mm.models.reference: the upstream forward (explicit softmax(QK^T)V, fp32 on
                 CPU) under torch.no_grad, as the official inference script runs it.

Measurement: the backends take turns inside every repeat (so machine load hits them alike); each
turn runs the model until at least the timed window has passed; the table shows the median
images/s over repeats and the median process CPU seconds per image. Peak: the best of several
large square matmuls in fp32 and in bf16 at the same thread count, per wall second and per CPU
second. On a machine shared with other jobs the wall-clock columns follow the load; the CPU columns
(model GFLOP per CPU-second against the matmul's GFLOP per CPU-second) barely do, provided threads
sleep instead of spinning when they wait: run with OMP_WAIT_POLICY=PASSIVE there.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _results import write_section  # noqa: E402

from lvface_mm.models import create_model  # noqa: E402
from lvface_mm.models.inference import cpu_has_native_bf16, prepare_for_inference  # noqa: E402
from lvface_mm.models.reference import reference_from  # noqa: E402


def matmul_gflops(dtype: torch.dtype, n: int, repeats: int) -> tuple[float, float]:
    """Best GFLOP per wall second and per process-CPU second of an (n x n) @ (n x n) matmul."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool, kernel selection
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        a @ b
        best_wall = min(best_wall, time.perf_counter() - wall0)
        best_cpu = min(best_cpu, time.process_time() - cpu0)
    return 2 * n**3 / best_wall / 1e9, 2 * n**3 / best_cpu / 1e9


def timed(fn: Callable[[], object], min_seconds: float) -> tuple[float, float, int]:
    """Run fn until min_seconds have passed; (wall seconds, process CPU seconds, calls)."""
    calls, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        calls += 1
        wall = time.perf_counter() - wall0
        if wall >= min_seconds:
            return wall, time.process_time() - cpu0, calls


def make_backends(
    model: torch.nn.Module,
    low: torch.nn.Module | None,
    reference: torch.nn.Module,
    ort: Callable[[object], object],
    default: Callable[[torch.Tensor], object],
    x: torch.Tensor,
) -> dict[str, Callable[[], object]]:
    """One zero-argument callable per backend, all embedding the same batch `x`."""
    x_np = x.numpy()

    def run_torch(module: torch.nn.Module, inference: bool) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode() if inference else torch.no_grad():
                return module(x)

        return call

    backends = {"default": lambda: default(x), "ours": run_torch(model, True)}
    if low is not None:
        backends["ours-bf16"] = run_torch(low, True)
    backends["onnxruntime"] = lambda: ort(x_np)
    backends["eager-ref"] = run_torch(reference, False)  # the official script runs under no_grad
    return backends


def bench_model(name: str, batches: list[int], args: argparse.Namespace, workdir: Path) -> list[dict[str, object]]:
    from lvface_mm.models.onnx import OnnxEncoder, export_onnx

    model = prepare_for_inference(create_model(name))
    gflops = model.config.flops_per_image / 1e9
    onnx_path = export_onnx(model, workdir / f"{name}.onnx")
    ort = OnnxEncoder(onnx_path, num_threads=torch.get_num_threads())
    reference = reference_from(model)
    os.environ["LVFACE_MM_ONNX_CACHE"] = str(workdir / "auto")
    from lvface_mm.faces import FaceEmbedder

    default = FaceEmbedder(model).encoder  # backend="auto"; detection is never set up
    print(f"  {name}: FaceEmbedder(backend='auto') runs {type(default).__name__}", flush=True)
    low = None
    if args.bf16 or cpu_has_native_bf16():
        low = prepare_for_inference(create_model(name), dtype=torch.bfloat16)
        low.load_state_dict(model.state_dict())

    rows = []
    for batch in batches:
        x = torch.rand(batch, 3, 112, 112) * 2 - 1  # (B, 3, 112, 112) crops in [-1, 1]
        backends = make_backends(model, low, reference, ort, default, x)
        samples: dict[str, list[tuple[float, float, int]]] = {k: [] for k in backends}
        if batch <= 8:  # first calls set up kernels and pools; at batch 64 one call costs seconds and changes nothing
            for fn in backends.values():
                fn()
        order = list(backends)
        for r in range(args.repeats):
            for key in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
                samples[key].append(timed(backends[key], args.min_seconds))
        for key, runs in samples.items():
            rate = statistics.median(batch * calls / wall for wall, _, calls in runs)
            cpu_per_image = statistics.median(cpu / (batch * calls) for _, cpu, calls in runs)
            rows.append({"model": name, "batch": batch, "backend": key, "images_s": rate,
                         "cpu_s_per_image": cpu_per_image, "gflops_per_image": gflops})
        print(f"  {name} batch {batch}: " + ", ".join(
            f"{r['backend']} {r['images_s']:.2f}/s" for r in rows if r["batch"] == batch and r["model"] == name
        ), flush=True)
    return rows


def report(rows: list[dict[str, object]], peak32: tuple[float, float], peak16: tuple[float, float],
           meta: dict[str, str]) -> str:
    lines = [
        f"### Encoder throughput on CPU ({meta['date']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Measured matmul peak at {meta['threads']} thread(s): fp32 {peak32[0]:.1f} GFLOP/s wall "
        f"({peak32[1]:.1f} per CPU-second), bf16 {peak16[0]:.1f} GFLOP/s wall ({peak16[1]:.1f} per CPU-second); "
        f"native bf16: {meta['native_bf16']}  ",
        f"1-min load average (all processes): {meta['load_before']} before, {meta['load_after']} after",
        "",
        "| model | batch | backend | images/s | vs onnxruntime | vs eager-ref | % of fp32 peak | CPU s / image "
        "| vs onnxruntime (CPU) | vs eager-ref (CPU) | % of fp32 peak (CPU) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        same = {r["backend"]: r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"]}
        ort, ref = same["onnxruntime"], same["eager-ref"]
        wall_gflops = row["images_s"] * row["gflops_per_image"]
        cpu_gflops = row["gflops_per_image"] / row["cpu_s_per_image"]
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['backend']} | {row['images_s']:.2f} "
            f"| {row['images_s'] / ort['images_s']:.2f}x | {row['images_s'] / ref['images_s']:.2f}x "
            f"| {100 * wall_gflops / peak32[0]:.0f}% | {row['cpu_s_per_image']:.3f} "
            f"| {ort['cpu_s_per_image'] / row['cpu_s_per_image']:.2f}x "
            f"| {ref['cpu_s_per_image'] / row['cpu_s_per_image']:.2f}x | {100 * cpu_gflops / peak32[1]:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, short timed windows")
    parser.add_argument("--models", nargs="+", default=["lvface_t", "lvface_b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--bf16", action="store_true", help="include bf16 even without native support")
    parser.add_argument("--markdown", type=Path, help="also write the results section to this file")
    args = parser.parse_args(argv)
    args.repeats = 3 if args.quick else 5
    args.min_seconds = 0.5 if args.quick else 2.0
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = f"{os.getloadavg()[0]:.1f}"
    peak32 = matmul_gflops(torch.float32, 2048 if args.quick else 4096, 5)
    # Without native bf16 a large bf16 matmul takes minutes (scalar fallback); a small one shows the rate.
    native = cpu_has_native_bf16()
    peak16 = matmul_gflops(torch.bfloat16, 2048 if native else 384, 3 if native else 1)
    print(f"matmul peak (wall, per CPU-s): fp32 {peak32}, bf16 {peak16} GFLOP/s", flush=True)

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args.batches, args, Path(tmp))

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/bench_encoder.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "threads": str(torch.get_num_threads()),
        "native_bf16": "yes" if native else "no",
        "load_before": load_before,
        "load_after": f"{os.getloadavg()[0]:.1f}",
    }
    text = report(rows, peak32, peak16, meta)
    print("\n" + text)
    if args.markdown:
        write_section(args.markdown, "bench_encoder", text)  # other scripts own other sections of the file
    return 0


if __name__ == "__main__":
    sys.exit(main())
