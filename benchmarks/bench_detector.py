"""False and missed faces of the default detector (dlib HOG) before and after the score floor and
the landmark check, on real photos with known faces.

    python benchmarks/bench_detector.py --quick    # photos at their own size + portraits at 40 px
    python benchmarks/bench_detector.py            # also every photo at 0.5x and 0.37x

Photos (nothing here is committed except the portraits):
    portraits      tests/data/portraits, 4 photos, 1 face each; also downscaled so the face is ~40 px
    group          the 4 portraits pasted side by side (as the tests do): 4 faces
    t1             insightface 2.1 wheel's `t1.jpg`, 1280x886, 6 faces (taken from PyPI with
                   `pip download --no-deps insightface==2.1` into --assets; skipped when offline)
    astronaut      scikit-image: Eileen Collins (1 face) and the round mission patch on her suit
    camera         scikit-image: the cameraman (1 face, in profile behind the camera)
    grace_hopper   matplotlib sample data (1 face)
    no faces       insightface's 4 `mask_*.jpg` and 14 scikit-image pictures without people

A detection counts as found when it overlaps an unclaimed annotated face with IoU >= 0.3 (best
score first); every other detection is false. Annotated boxes are dlib's own boxes on the full-size
photos, checked by eye. The detector runs once per photo with a floor of -0.5 and the settings are
applied afterwards with `screen_faces`, exactly what `FaceEmbedder.detect` does.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _results import write_section  # noqa: E402

from lvface_mm.faces import DLIB_DEFAULT_SCORE_THRESHOLD, LandmarkCheck, create_detector, load_image  # noqa: E402
from lvface_mm.faces.screening import screen_faces  # noqa: E402

PORTRAIT_BOXES = {  # x1, y1, x2, y2 of the one face
    "obama": (201, 81, 357, 237),
    "obama2": (81, 150, 237, 306),
    "obama3": (179, 80, 255, 156),
    "biden": (126, 66, 216, 157),
}
T1_BOXES = [
    (1118, 283, 1227, 391), (67, 283, 176, 391), (724, 367, 833, 475),
    (450, 295, 558, 403), (870, 67, 1000, 197), (275, 176, 365, 266),
]
NO_FACE_SKIMAGE = (
    "chelsea", "coffee", "rocket", "coins", "moon", "text", "page", "clock", "hubble_deep_field",
    "immunohistochemistry", "logo", "colorwheel", "brick", "horse",
)


@dataclass
class Photo:
    name: str
    group: str
    image: np.ndarray  # (H, W, 3) uint8
    faces: list[tuple[float, float, float, float]]


def scaled(photo: Photo, factor: float, group: str) -> Photo:
    import cv2

    h, w = photo.image.shape[:2]
    image = cv2.resize(photo.image, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_AREA)
    return Photo(f"{photo.name}@{factor:.2f}", group, image, [tuple(c * factor for c in b) for b in photo.faces])


def insightface_images(assets: Path) -> Path | None:
    """The folder of images from the insightface 2.1 wheel, downloaded once with pip; None when impossible."""
    out = assets / "insightface_images"
    if (out / "t1.jpg").is_file():
        return out
    assets.mkdir(parents=True, exist_ok=True)
    wheel = assets / "insightface-2.1-py3-none-any.whl"
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(assets), "insightface==2.1"]
        if subprocess.run(cmd, capture_output=True).returncode != 0 or not wheel.is_file():
            return None
    out.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if member.startswith("insightface/data/images/"):
                (out / Path(member).name).write_bytes(z.read(member))
    return out


def rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def photos(quick: bool, assets: Path) -> tuple[list[Photo], list[str]]:
    import matplotlib.cbook
    import skimage.data

    from tests._faces_fixtures import composite, panel_spans, portrait

    notes = []
    out = [Photo(n, "portraits", portrait(n), [b]) for n, b in PORTRAIT_BOXES.items()]
    names = tuple(PORTRAIT_BOXES)
    spans = panel_spans(names)
    group = composite(names)
    # The composite pastes each portrait scaled to 400 px high at (span start, 20).
    group_boxes = []
    for (x0, _), n in zip(spans, names):
        s = 400 / portrait(n).shape[0]
        x1, y1, x2, y2 = PORTRAIT_BOXES[n]
        group_boxes.append((x0 + x1 * s, 20 + y1 * s, x0 + x2 * s, 20 + y2 * s))
    out.append(Photo("group", "group", group, group_boxes))
    out.append(Photo("astronaut", "astronaut", rgb(skimage.data.astronaut()), [(175, 76, 266, 167)]))
    out.append(Photo("camera", "camera", rgb(skimage.data.camera()), [(216, 130, 269, 183)]))
    hopper = load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).array
    out.append(Photo("grace_hopper", "grace_hopper", hopper, [(180, 139, 367, 326)]))
    images = insightface_images(assets)
    if images is None:
        notes.append("insightface 2.1 could not be downloaded: t1.jpg and the mask pictures are missing")
    else:
        out.append(Photo("t1", "t1", load_image(images / "t1.jpg").array, list(T1_BOXES)))
        for colour in ("black", "blue", "green", "white"):
            out.append(Photo(f"mask_{colour}", "no faces", load_image(images / f"mask_{colour}.jpg").array, []))
    for name in NO_FACE_SKIMAGE:
        out.append(Photo(name, "no faces", rgb(getattr(skimage.data, name)()), []))
    # Faces of about 40 px: the smallest size the defaults promise to keep.
    small = [scaled(p, 40 / (p.faces[0][2] - p.faces[0][0]), "portraits at 40 px") for p in out[:4]]
    extra = []
    if not quick:
        for factor in (0.5, 0.37):
            extra += [
                scaled(p, factor, f"{p.group} at {factor}x") for p in out if p.group in ("t1", "astronaut", "group")
            ]
    return out + small + extra, notes


def iou(a: np.ndarray, b: np.ndarray) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    union = float(np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2])) - inter
    return inter / max(union, 1e-9)


def count(faces: list, truth: list) -> tuple[int, int]:
    """(found, false) for detections `faces` against annotated boxes `truth`."""
    free = [np.asarray(t, np.float32) for t in truth]
    found = false = 0
    for f in sorted(faces, key=lambda f: -f.score):
        match = max(range(len(free)), key=lambda i: iou(f.box, free[i]), default=None)
        if match is not None and iou(f.box, free[match]) >= 0.3:
            free.pop(match)
            found += 1
        else:
            false += 1
    return found, false


def patch_scores(detector, image: np.ndarray) -> dict[str, float | str]:
    """dlib's score of the mission patch on the astronaut's suit at other sizes and JPEG qualities."""
    import io

    import cv2
    from PIL import Image

    patch = np.array([126, 335, 216, 426], np.float32)
    variants = {}
    for factor in (0.8, 0.9, 1.0, 1.1, 1.25):
        variants[f"{factor}x"] = (cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA), factor)
    for quality in (95, 75, 50):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=quality)
        variants[f"JPEG q{quality}"] = (np.asarray(Image.open(buf).convert("RGB")), 1.0)
    out: dict[str, float | str] = {}
    for name, (img, factor) in variants.items():
        scores = [f.score for f in detector.detect(img) if iou(f.box / factor, patch) >= 0.3]
        out[name] = round(max(scores), 2) if scores else "not found"
    return out


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import dlib

    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, dlib {dlib.__version__}; 1-min load {load:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="photos at their own size and portraits at 40 px only")
    parser.add_argument("--assets", type=Path, default=Path.home() / ".cache" / "lvface_mm" / "bench_assets")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "faces.md")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)

    detector = create_detector("dlib", score_threshold=-0.5)
    items, notes = photos(args.quick, args.assets)
    min_face_size = 20.0  # the pipeline's default size floor applies in every setting
    raw = [[f for f in detector.detect(p.image) if min(f.width, f.height) >= min_face_size] for p in items]

    check = LandmarkCheck()
    settings = {
        "before (score >= 0, no landmark check)": (0.0, None),
        f"score >= {DLIB_DEFAULT_SCORE_THRESHOLD} only": (DLIB_DEFAULT_SCORE_THRESHOLD, None),
        "landmark check only (score >= 0)": (0.0, check),
        f"**after: defaults (score >= {DLIB_DEFAULT_SCORE_THRESHOLD} + landmark check)**": (
            DLIB_DEFAULT_SCORE_THRESHOLD, check),
    }
    groups = list(dict.fromkeys(p.group for p in items))

    def tally(min_score: float, lm: LandmarkCheck | None, group: str | None = None) -> tuple[int, int]:
        found = false = 0
        for p, faces in zip(items, raw):
            if group is None or p.group == group:
                f_, x_ = count(screen_faces(faces, min_score, lm), p.faces)
                found, false = found + f_, false + x_
        return found, false

    def sizes(group: str) -> str:
        widths = [b[2] - b[0] for p in items if p.group == group for b in p.faces]
        return f"{min(widths):.0f}-{max(widths):.0f} px" if widths else "-"

    lines = [
        f"### Detector: false and missed faces, dlib HOG before and after screening ({datetime.date.today()})",
        "",
        f"Command: `python benchmarks/bench_detector.py{' --quick' if args.quick else ''}`  ",
        f"Machine: {machine()}  ",
        "Cells: faces found / faces present, and false detections. Found = overlaps an annotated face "
        "(IoU >= 0.3); annotations are dlib's boxes on the full-size photos, checked by eye. The pipeline's "
        "20 px size floor applies throughout.",
        "",
        "| photos | count | face widths | " + " | ".join(settings) + " |",
        "| --- | ---: | --- |" + " --- |" * len(settings),
    ]
    for g in groups + [None]:
        cells = []
        for min_score, lm in settings.values():
            found, false = tally(min_score, lm, g)
            present = sum(len(p.faces) for p in items if g is None or p.group == g)
            cells.append(f"{found}/{present}, {false} false")
        n = sum(1 for p in items if g is None or p.group == g)
        label, width = ("**all**", "") if g is None else (g, sizes(g))
        lines.append(f"| {label} | {n} | {width} | " + " | ".join(cells) + " |")
    total = sum(len(p.faces) for p in items)
    lines += ["", "Score floor sweep (all photos):", "",
              "| score floor | found, with landmark check | false, with check | found, no check | false, no check "
              "| faces missed with check (photo: face width) |",
              "| ---: | ---: | ---: | ---: | ---: | --- |"]
    for floor in (-0.5, -0.25, 0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5):
        missed = []
        for p, faces in zip(items, raw):
            kept = screen_faces(faces, floor, check)
            for b in p.faces:
                if not any(iou(f.box, np.asarray(b, np.float32)) >= 0.3 for f in kept):
                    missed.append(f"{p.name}: {b[2] - b[0]:.0f} px")
        (fc, xc), (fn, xn) = tally(floor, check), tally(floor, None)
        lines.append(f"| {floor} | {fc}/{total} | {xc} | {fn}/{total} | {xn} | {', '.join(missed) or '-'} |")
    dropped = [
        f"{p.name} score {f.score:.2f}: {check.reason(f)}" for p, faces in zip(items, raw) for f in faces
        if f.score >= 0 and check.reason(f) is not None
    ]
    lines += ["", "Detections scoring >= 0 that the landmark check drops: " + ("; ".join(dropped) or "none") + "."]
    lines += [f"Note: {n}." for n in notes]
    small = [f.score for p, faces in zip(items, raw) if p.group == "portraits at 40 px" for f in faces]
    patch = patch_scores(detector, next(p.image for p in items if p.name == "astronaut"))
    lines += [
        "",
        "The astronaut's mission patch (the false face of the issue) under changes of size and JPEG quality: "
        + ", ".join(f"{k} {v}" for k, v in patch.items())
        + f" (highest {max(v for v in patch.values() if isinstance(v, float)):.2f}; the default floor is "
        f"{DLIB_DEFAULT_SCORE_THRESHOLD}). The portraits at 40 px score {min(small):.2f}-{max(small):.2f}.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_write:
        write_section(args.output, "bench_detector", report)
        print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
