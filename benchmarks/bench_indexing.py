"""Photo-indexing throughput: today's one-process `PhotoIndex.add` against the sharded job with 1 and
2 local worker processes, side by side in one run.

    python benchmarks/bench_indexing.py --quick    # 24 photos, tiny + LVFace-B/CLIP B-32, 1 repeat
    python benchmarks/bench_indexing.py            # 64 photos, 3 repeats (median)

Photos: the committed portraits, mirrored / slightly rotated (distinct bytes, so each is indexed).
Models: (a) the tests' tiny random encoder + tiny CLIP, (b) LVFace-B + CLIP ViT-B-32 architectures
with random weights (the compute of the real weights, which are not available offline).

Columns:
- photos/s wall, end to end: the whole job, start to merged database, including spawning the
  workers and building their models (what a user waits for); 1 worker runs in this process on 1 thread.
- photos/s wall, indexing: from the first shard's start to the last shard's end (workers running,
  models built): the rate a long job settles at. For today's path: the timed pass (models warm).
- photos per CPU-second: photos / CPU time spent indexing (all threads of all workers; model
  building excluded on both sides). Does not depend on other work on the machine.
- vs 1 worker: indexing photos/s with 2 workers / with 1 worker, same run.
- cores used: CPU-seconds / indexing wall seconds, how many cores the indexing actually got. With
  2 workers on an idle 2-core machine it approaches 2; less means other work held the cores.

Writes benchmarks/results/indexing.md (and prints it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _photos import make_photos

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "indexing.md"


def configs() -> dict:
    from lvface_mm.gallery.indexing import EncoderSpec

    return {
        "tiny (tests, --tiny)": EncoderSpec(tiny_seed=0, tiny_clip_seed=0),
        "LVFace-B + CLIP ViT-B-32 (random weights)": EncoderSpec(face_model="lvface_b", random_seed=0,
                                                                 clip_pretrained=None),
    }


def bench_direct(spec, photos: Path, tmp: Path, n: int, repeats: int) -> dict:
    """Today's path: PhotoIndex.add in this process, one SQLite transaction per photo."""
    import torch

    from lvface_mm.gallery.photos import PhotoIndex

    torch.set_num_threads(os.cpu_count() or 1)  # as bench_gallery.py measured the 0.81
    embedder, clip = spec.build()
    walls, cpus = [], []
    for r in range(repeats + 1):  # the first pass warms up (landmark model, allocators)
        start, cpu = time.perf_counter(), time.process_time()
        index = PhotoIndex(tmp / f"direct-{r}.db", embedder=embedder, clip=clip, face_model=spec.face_key)
        report = index.add([photos])
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert report.indexed == n and not report.failed, report
        if r:
            walls.append(wall)
            cpus.append(cpu)
    return {"photos_per_s": n / statistics.median(walls), "photos_per_cpu_s": n / statistics.median(cpus),
            "steady_photos_per_s": n / statistics.median(walls),  # warm models: start-up is not in the time
            "cores_used": statistics.median(cpus) / statistics.median(walls)}


def bench_job(spec, photos: Path, tmp: Path, n: int, repeats: int, workers: int, shard_size: int) -> dict:
    from lvface_mm.gallery.index_job import run_index_job
    from lvface_mm.gallery.indexing import IndexJobConfig

    walls, spans, cpus = [], [], []
    for r in range(repeats):
        config = IndexJobConfig(str(tmp / f"job{workers}-{r}.db"), str(tmp / f"job{workers}-{r}.shards"), shard_size)
        start = time.perf_counter()
        report = run_index_job([photos], config, spec, engine="local", workers=workers, threads=1)
        walls.append(time.perf_counter() - start)
        assert report.indexed == n and not report.failed and not report.shard_errors, report
        cpus.append(report.worker_cpu_seconds)
        spans.append(report.indexing_span)
    return {"photos_per_s": n / statistics.median(walls), "photos_per_cpu_s": n / statistics.median(cpus),
            "steady_photos_per_s": n / statistics.median(spans),
            "cores_used": statistics.median(cpus) / statistics.median(spans)}


def machine() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu, flags = platform.processor() or "unknown CPU", []
    import torch

    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores ({', '.join(simd) or 'no'} SIMD flags of interest), load average "
            f"{load:.1f} at start; Python {platform.python_version()}, torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 photos, 1 repeat")
    parser.add_argument("--photos", type=int, help="number of photos (default 64, 24 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed repeats, median reported (default 3, 1 with --quick)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not write results/indexing.md")
    args = parser.parse_args(argv)
    n = args.photos or (24 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    shard_size = max(1, n // 8)  # several shards per worker, so both workers stay busy to the end
    header = machine()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["LVFACE_MM_ONNX_CACHE"] = str(tmp / "onnx")  # random weights: not the user's cache
        photos = tmp / "photos"
        make_photos(photos, n)
        for i, (label, spec) in enumerate(configs().items()):
            work = tmp / f"config{i}"  # databases remember their encoders: one folder per configuration
            work.mkdir()
            direct = bench_direct(spec, photos, work, n, repeats)
            one = bench_job(spec, photos, work, n, repeats, 1, shard_size)
            two = bench_job(spec, photos, work, n, repeats, 2, shard_size)
            rows.append((label, direct, one, two))
            print(f"{label}: direct {direct}, 1 worker {one}, 2 workers {two}", flush=True)
            shutil.rmtree(work)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Photo indexing: one process vs sharded job",
        "",
        f"Command: `python benchmarks/bench_indexing.py{' --quick' if args.quick else ''}`  ",
        f"Date: {datetime.date.today().isoformat()}; total run {(time.perf_counter() - started) / 60:.1f} min  ",
        f"Machine: {header}; load average {load_end:.1f} at the end  ",
        f"Photos: {n} (portraits, mirrored / rotated copies), {shard_size} per shard; median of {repeats} run(s)",
        "",
        "| models | path | photos/s wall, end to end | photos/s wall, indexing | vs 1 worker (indexing) "
        "| photos per CPU-second | vs today (CPU) | cores used |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, direct, one, two in rows:
        for name, r in (("today: `PhotoIndex.add`, 1 process", direct), ("sharded job, 1 worker (1 thread)", one),
                        ("sharded job, 2 local workers (1 thread each)", two)):
            lines.append(f"| {label} | {name} | {r['photos_per_s']:.2f} | {r['steady_photos_per_s']:.2f} | "
                         f"{r['steady_photos_per_s'] / one['steady_photos_per_s']:.2f}x | "
                         f"{r['photos_per_cpu_s']:.2f} | {r['photos_per_cpu_s'] / direct['photos_per_cpu_s']:.2f}x | "
                         f"{r['cores_used']:.2f} |")
    lines += [
        "",
        "End-to-end wall-clock includes spawning the workers and building their models, which a short run "
        "cannot amortise; the indexing column leaves that out. Photos per CPU-second excludes model building "
        "on both sides. On a machine "
        "shared with other work (see the load average) two workers compete with that work for the two cores, "
        "and the wall-clock ratio falls below what an idle machine gives; the CPU column is the comparable one.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
