"""End-to-end photos/s of the face pipeline (load + detect + align + embed), with the time share of
each stage, next to dlib's own recognition pipeline on the same photos in the same run.

    python benchmarks/bench_pipeline.py --quick    # 3 timed passes over 8 photos
    python benchmarks/bench_pipeline.py            # 5 passes over 16 photos, also bf16 for B

Photos: the four committed portraits (tests/data/portraits, 282-512 x 640 px, one face each) and a
group picture made by pasting them side by side (4 faces), repeated to fill a pass.

Pipelines:
    lvface_t / lvface_b   FaceEmbedder: dlib HOG detector + 68-point landmarks -> 5 points -> ArcFace
                          alignment -> FaceViT T or B (random weights: speed does not depend on them),
                          fp32 unless stated, batch 64 across photos.
    dlib reference        what `face_recognition.face_encodings` does: dlib HOG (upsample 1) + 5-point
                          shape predictor + dlib ResNet-34 128-d descriptor, one face at a time.

Each configuration gets one warm-up pass, then the median wall time of the timed passes. Stage
shares come from `FaceEmbedder.stage_seconds` summed over the timed passes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _photos import PORTRAITS
from _results import write_section

ROOT = Path(__file__).resolve().parent.parent


def group_photo(out: Path) -> Path:
    from PIL import Image

    panels = []
    for p in PORTRAITS:
        with Image.open(p) as im:
            panels.append(im.convert("RGB").resize((round(im.width * 400 / im.height), 400), Image.BILINEAR))
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 100, 440), (128, 128, 128))
    x = 20
    for p in panels:
        canvas.paste(p, (x, 20))
        x += p.width + 20
    canvas.save(out, quality=90)
    return out


def photo_list(n: int, group: Path) -> list[str]:
    base = [str(p) for p in PORTRAITS] + [str(group)]
    return [base[i % len(base)] for i in range(n)]


class LVFacePipeline:
    """FaceEmbedder on a randomly initialised variant; `stages` accumulates over timed passes."""

    def __init__(self, model: str, dtype: str | None) -> None:
        from lvface_mm.faces import FaceEmbedder
        from lvface_mm.models import create_model

        # The default backend ("auto"): an fp32 FaceViT on the CPU runs from a cached ONNX export.
        self.embedder = FaceEmbedder(create_model(model), dtype=dtype, device="cpu", batch_size=64)
        self.name = f"{model} {dtype or 'fp32'} ({self.embedder.encoder.name})"

    def __call__(self, photos: list[str]) -> int:
        return sum(len(r.faces) for r in self.embedder.embed(photos))

    def reset(self) -> None:
        self.embedder.reset_timings()

    @property
    def stages(self) -> dict[str, float] | None:
        return dict(self.embedder.stage_seconds)


class DlibReference:
    """What `face_recognition.face_encodings` does: HOG (upsample 1), 5-point shapes, ResNet-34 128-d."""

    name = "dlib reference (HOG + ResNet-34, 128-d)"
    stages = None

    def __init__(self) -> None:
        import dlib

        from lvface_mm.faces.dlib_detector import face_recognition_models_file

        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(face_recognition_models_file("shape_predictor_5_face_landmarks.dat")))
        resnet = face_recognition_models_file("dlib_face_recognition_resnet_model_v1.dat")
        self.encoder = dlib.face_recognition_model_v1(str(resnet))

    def __call__(self, photos: list[str]) -> int:
        from PIL import Image

        n = 0
        for path in photos:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
            for rect in self.detector(image, 1):
                np.asarray(self.encoder.compute_face_descriptor(image, self.predictor(image, rect)))  # (128,)
                n += 1
        return n

    def reset(self) -> None:
        pass


def measure(pipelines: list, photos: list[str], passes: int) -> list[dict]:
    """Warm up each pipeline once, then time them in turn for `passes` rounds (interleaved, so a
    change in machine load hits all of them alike); report medians."""
    faces = [pipe(photos) for pipe in pipelines]
    for pipe in pipelines:
        pipe.reset()
    times: list[list[float]] = [[] for _ in pipelines]
    cpu: list[list[float]] = [[] for _ in pipelines]  # process CPU time: all threads, barely affected by other load
    for _ in range(passes):
        for i, pipe in enumerate(pipelines):
            start, start_cpu = time.perf_counter(), time.process_time()
            pipe(photos)
            times[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    return [
        {"name": p.name, "seconds": statistics.median(t), "cpu": statistics.median(c), "faces": f, "stages": p.stages}
        for p, t, c, f in zip(pipelines, times, cpu, faces)
    ]


def machine(load_before: float) -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or "?"
    threads = torch.get_num_threads()
    return (
        f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads; 1-min load average "
        f"(all processes) {load_before:.1f} before and {load_average():.1f} after the run"
    )


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer photos and passes, fp32 only")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "faces.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    n_photos, passes = (8, 3) if args.quick else (16, 5)
    load_before = load_average()

    with tempfile.TemporaryDirectory() as tmp:
        # Random weights each run: their ONNX exports stay out of the user's cache.
        os.environ.setdefault("LVFACE_MM_ONNX_CACHE", str(Path(tmp) / "onnx"))
        group = group_photo(Path(tmp) / "group.jpg")
        photos = photo_list(n_photos, group)
        n_groups = photos.count(str(group))
        configs = [("lvface_t", None), ("lvface_b", None)] + ([] if args.quick else [("lvface_b", "bf16")])
        pipelines = [LVFacePipeline(model, dtype) for model, dtype in configs] + [DlibReference()]
        rows = measure(pipelines, photos, passes)
    reference = rows[-1]

    ref_rate = n_photos / reference["seconds"]
    lines = [
        f"### Face pipeline: detect + align + embed ({datetime.date.today().isoformat()})",
        "",
        f"Command: `python benchmarks/bench_pipeline.py{' --quick' if args.quick else ''}`  ",
        f"Machine: {machine(load_before)}  ",
        f"Workload: {n_photos} photos per pass ({n_photos - n_groups} portraits + {n_groups} group pictures, "
        f"{rows[0]['faces']} faces), median of {passes} interleaved passes after one warm-up.",
        "",
        "| pipeline | photos/s | faces/s | vs dlib reference | CPU s / photo | vs reference (CPU) "
        "| load | detect | align | embed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        name = r["name"]
        rate = n_photos / r["seconds"]
        if r["stages"]:
            total = sum(r["stages"].values())
            shares = " | ".join(f"{100 * r['stages'][s] / total:.0f}%" for s in ("load", "detect", "align", "embed"))
        else:
            shares = "- | - | - | -"
        cpu_per_photo = r["cpu"] / n_photos
        cpu_ratio = reference["cpu"] / r["cpu"]
        lines.append(
            f"| {name} | {rate:.2f} | {r['faces'] / r['seconds']:.2f} | {rate / ref_rate:.2f}x | "
            f"{cpu_per_photo:.3f} | {cpu_ratio:.2f}x | {shares} |"
        )
    lines += [
        "",
        "Ratios above 1 mean faster than the reference. CPU s / photo is the process CPU time (all threads) "
        "per photo, which other jobs on the machine barely change; the wall-clock columns do depend on the "
        "load shown above. Stage shares are of the FaceEmbedder's own wall time (load = decode + EXIF + "
        "conversion; detect = dlib HOG + 68-point landmarks; align = similarity fit + warp; embed = encoder "
        "forward: `onnx-auto` is the default backend on CPU, onnxruntime on a cached export of the weights).",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        write_section(args.output, "bench_pipeline", report)
        print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
