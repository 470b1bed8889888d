"""GPU photo-indexing throughput, in one go on one GPU (an H200 was the target; < 10 min), printed.

    python benchmarks/device/bench_index_gpu.py              # 512 photos
    python benchmarks/device/bench_index_gpu.py --photos 128 # a shorter run

Measures, with LVFace-B and CLIP ViT-B-32 architectures on random weights (the compute of the real
ones; nothing is downloaded):

1. encoder only: aligned 112x112 crops per second through LVFace-B on the GPU (fp32, bf16) and CLIP
   images per second, at batch 256: the ceiling the GPU sets.
2. end to end: photos per second from files to a merged database, with today's one-process
   `PhotoIndex.add` on the GPU, and with the sharded job's local engine, N CPU worker processes
   (decode + dlib detection + alignment on the CPU) sharing the one GPU for the encoders.

dlib HOG detection runs on the CPU, so the end-to-end rows show how many CPU workers one GPU can feed;
the encoder rows show the GPU's own limit. Needs CUDA; refuses to run without it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def encoder_rates(batch: int, seconds: float, device: str) -> list[tuple[str, float]]:
    import torch

    from lvface_mm.gallery.clip import ClipConfig, ClipEncoder
    from lvface_mm.models import create_model

    out = []
    torch.manual_seed(0)
    model = create_model("lvface_b").to(device).eval()
    x = torch.randn(batch, 3, 112, 112, device=device)
    kind = torch.device(device).type
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with torch.inference_mode(), torch.autocast(kind, dtype=dtype, enabled=dtype != torch.float32):
            for _ in range(3):
                model(x)
            sync(device)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                model(x)
                n += batch
            sync(device)
        out.append((f"LVFace-B crops/s ({name}, batch {batch})", n / (time.perf_counter() - start)))
    clip = ClipEncoder.from_pretrained(ClipConfig("ViT-B-32", None), device=device)
    images = torch.randn(batch, 3, clip.image_size, clip.image_size, device=device)
    with torch.inference_mode():
        for _ in range(3):
            clip.model.encode_image(images)
        sync(device)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            clip.model.encode_image(images)
            n += batch
        sync(device)
    out.append((f"CLIP ViT-B-32 images/s (fp32, batch {batch}, preprocessed)", n / (time.perf_counter() - start)))
    return out


def sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def end_to_end(photos: Path, tmp: Path, n: int, worker_counts: list[int], device: str) -> list[tuple[str, float]]:
    from lvface_mm.gallery.index_job import run_index_job
    from lvface_mm.gallery.indexing import EncoderSpec, IndexJobConfig
    from lvface_mm.gallery.photos import PhotoIndex

    spec = EncoderSpec(face_model="lvface_b", random_seed=0, clip_pretrained=None, device=device, backend="torch")
    out = []
    embedder, clip = spec.build()
    warm = sorted(photos.iterdir())[:8]  # first use loads the landmark model and the CUDA kernels
    PhotoIndex(tmp / "warm.db", embedder=embedder, clip=clip, face_model=spec.face_key).add(warm)
    start = time.perf_counter()
    report = PhotoIndex(tmp / "direct.db", embedder=embedder, clip=clip, face_model=spec.face_key).add([photos])
    assert report.indexed == n, report
    out.append(("today: PhotoIndex.add, 1 process, GPU encoders", n / (time.perf_counter() - start)))
    del embedder, clip
    cores = os.cpu_count() or 1
    for workers in worker_counts:
        config = IndexJobConfig(str(tmp / f"job{workers}.db"), str(tmp / f"job{workers}.shards"),
                                shard_size=max(8, n // (4 * workers)), photo_batch=16)
        start = time.perf_counter()
        report = run_index_job([photos], config, spec, engine="local", workers=workers,
                               threads=max(1, cores // workers))
        assert report.indexed == n and not report.shard_errors, report
        out.append((f"sharded job, {workers} local workers sharing the GPU (incl. start-up)",
                     n / (time.perf_counter() - start)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per encoder row")
    parser.add_argument("--batch", type=int, default=256, help="encoder batch")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to smoke-test this script")
    parser.add_argument("--workers", type=int, nargs="*", help="local worker counts (default 1, cores/2, cores)")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: this script measures GPU indexing and needs CUDA", file=sys.stderr)
        return 2
    from bench_indexing import make_photos

    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU (smoke test)"
    print(f"device: {name}; CPU cores: {os.cpu_count()}; torch {torch.__version__}",
          flush=True)
    started = time.perf_counter()
    for label, rate in encoder_rates(args.batch, args.seconds, args.device):
        print(f"{label}: {rate:,.0f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["LVFACE_MM_ONNX_CACHE"] = str(tmp / "onnx")
        make_photos(tmp / "photos", args.photos)
        cores = os.cpu_count() or 1
        counts = args.workers or sorted({1, max(1, cores // 2), cores})
        for label, rate in end_to_end(tmp / "photos", tmp, args.photos, counts, args.device):
            print(f"{label}: {rate:.1f} photos/s", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
