"""`lvface-mm embed`: detect, align and embed every face in images or folders into .npz or .parquet.

Output (one row per face): `embeddings` (F, 512) float32 L2-normalised, `norms` (F,), `boxes` (F, 4)
x1y1x2y2, `landmarks` (F, 5, 2), `scores` (F,), `sources` (F,) the file of each face and
`face_index` (F,) its rank in that file (largest first). The .npz also lists every input in
`files` with its `file_errors` ("" when fine) and `file_num_faces`, and the run settings as JSON in
`meta`. Files that fail are reported and skipped; the output is written atomically.

    lvface-mm embed photos/ -o faces.npz
    lvface-mm embed photos/ --model lvface_l -o faces.parquet

Exit status: 0 all inputs read, 1 some inputs failed (the others are saved), 2 nothing to do or every
input failed (nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from ..atomic_file import atomic_path
from ._common import cli_terms

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}
)


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None = "lvface_b") -> None:
    """Encoder and detector options shared by `embed`, `verify` and `gallery` (which passes
    ``default_model=None``: a gallery's own encoder is the default there)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=default_model, help="registered model name (default: "
                   + (f"{default_model})" if default_model else "the gallery's own, else lvface_b)"))
    g.add_argument("--checkpoint", type=Path, help="local checkpoint for --model instead of the official weights")
    g.add_argument("--tiny", action="store_true", help="use lvface_tiny with random weights (tests, demos)")
    g.add_argument("--seed", type=int, default=0, help="seed of random weights (--tiny / models without weights)")
    g.add_argument(
        "--backend",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="auto: onnxruntime from a cached export for fp32 on CPU, else PyTorch (default)",
    )
    g.add_argument("--onnx-path", type=Path, help="ONNX encoder for --backend onnx (default: the official file)")
    g.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda if available)")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="encoder precision (default fp32)")
    g.add_argument("--flip", action="store_true", help="flip-test: add the mirrored crop's features")
    g.add_argument("--batch-size", type=int, default=64)
    d = parser.add_argument_group("detection")
    d.add_argument("--detector", default="dlib", help="detector name (dlib, dlib_cnn, scrfd, retinaface)")
    d.add_argument("--detector-weights", type=Path, help="the .onnx file of an scrfd/retinaface detector")
    d.add_argument("--min-face-size", type=float, default=20.0, help="ignore faces smaller than this (px)")
    d.add_argument("--max-faces", type=int, default=None, help="keep at most this many faces per image")
    d.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="largest image accepted, in pixels (default 50000000); bigger JPEGs are decoded reduced")
    d.add_argument(
        "--min-detection-score",
        type=float,
        default=None,
        help="drop detections scoring below this, in the detector's units (default: the detector's own; dlib 0.25)",
    )
    d.add_argument(
        "--no-landmark-check",
        dest="landmark_check",
        action="store_false",
        help="keep detections whose five landmarks do not look like a face (checked by default)",
    )
    d.add_argument(
        "--assume-aligned",
        choices=("auto", "yes", "no"),
        default="auto",
        help="inputs are aligned face crops: yes, no, or auto (only exactly 112x112 images)",
    )


def build_embedder(args: argparse.Namespace):
    """A FaceEmbedder from parsed `add_model_arguments` options; raises ValueError on bad combinations."""
    common = dict(
        detector=args.detector,
        detector_kwargs={"model_path": args.detector_weights} if args.detector_weights else None,
        device=args.device,
        dtype=args.dtype,
        flip_test=args.flip,
        batch_size=args.batch_size,
        max_faces=args.max_faces,
        min_face_size=args.min_face_size,
        min_detection_score=args.min_detection_score,
        landmark_check=args.landmark_check,
    )
    if args.max_pixels is not None:
        if args.max_pixels < 1:
            raise ValueError(f"--max-pixels {args.max_pixels}: expected a positive number of pixels")
        common["max_image_pixels"] = args.max_pixels
    if args.checkpoint is not None and Path(args.checkpoint).is_dir():
        raise ValueError(f"--checkpoint {args.checkpoint} is a folder; give the .pt or .safetensors file inside it")
    if args.detector_weights and args.detector not in ("scrfd", "retinaface"):
        raise ValueError(f"--detector-weights is for the ONNX detectors (scrfd, retinaface), not {args.detector!r}")
    if args.detector in ("scrfd", "retinaface") and not args.detector_weights:
        raise ValueError(f"--detector {args.detector} needs --detector-weights FILE.onnx (no weights are bundled)")
    embedder = _build_encoder(args, common)
    if args.assume_aligned != "yes":
        try:
            embedder.detector  # noqa: B018 - build it now: a missing extra or file fails before any work
        except TypeError as exc:
            raise ValueError(f"detector {args.detector!r}: {exc}") from exc
    return embedder


def _build_encoder(args: argparse.Namespace, common: dict):
    from lvface_mm.faces import FaceEmbedder
    from lvface_mm.models import get_model_spec

    if args.tiny:
        if args.backend == "onnx" or args.checkpoint:
            raise ValueError("--tiny means random PyTorch weights; it excludes --backend onnx and --checkpoint")
        return FaceEmbedder.from_tiny(seed=args.seed, backend=args.backend, **common)
    if args.backend == "onnx":
        return FaceEmbedder(args.model, backend="onnx", onnx_path=args.onnx_path, **common)
    spec = get_model_spec(args.model)
    if args.checkpoint is None and spec.weights is None:
        print(f"note: {spec.name} has no official weights; using random weights (seed {args.seed})", file=sys.stderr)
        import torch

        from lvface_mm.models import create_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = create_model(spec.name)
        return FaceEmbedder(model, backend=args.backend, **common)
    return FaceEmbedder(args.model, checkpoint_path=args.checkpoint, backend=args.backend, **common)


def assume_aligned_flag(value: str) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="out.npz or out.parquet (default: embeddings.npz in the current folder)")
    parser.add_argument("-q", "--quiet", "--no-progress", dest="no_progress", action="store_true",
                        help="no progress bar")
    add_model_arguments(parser)


def collect_images(paths: Iterable[Path]) -> list[Path]:
    """Files given explicitly are kept whatever their suffix (unreadable ones get reported); folders
    contribute their image files, recursively, in sorted order. Missing paths are kept to be reported."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            files.extend(sorted(found))
        else:
            files.append(path)
    return files


def write_npz(output: Path, arrays: dict) -> None:
    import numpy as np

    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_parquet(output: Path, arrays: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = arrays["embeddings"]
    table = pa.table(
        {
            "source": pa.array(arrays["sources"].tolist(), pa.string()),
            "face_index": pa.array(arrays["face_index"]),
            "score": pa.array(arrays["scores"]),
            "norm": pa.array(arrays["norms"]),
            "box": pa.FixedSizeListArray.from_arrays(pa.array(arrays["boxes"].reshape(-1)), 4),
            "landmarks": pa.FixedSizeListArray.from_arrays(pa.array(arrays["landmarks"].reshape(-1)), 10),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
        }
    )
    table = table.replace_schema_metadata({"lvface_mm": arrays["meta"].item()})
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        pq.write_table(table, tmp)


class FaceTable:
    """Collects the per-face fields of embedding results, dropping crops and tokens as it goes, so
    memory grows with 2 KB per face rather than with whole results."""

    def __init__(self) -> None:
        self.sources: list[str] = []
        self.face_index: list[int] = []
        self.embeddings: list = []
        self.norms: list[float] = []
        self.boxes: list = []
        self.landmarks: list = []
        self.scores: list[float] = []
        self.files: list[str] = []
        self.file_errors: list[str] = []
        self.file_num_faces: list[int] = []

    def add(self, result) -> None:
        self.files.append(result.source)
        self.file_errors.append(result.error or "")
        self.file_num_faces.append(len(result.faces))
        for i, face in enumerate(result.faces):
            self.sources.append(result.source)
            self.face_index.append(i)
            self.embeddings.append(face.embedding)
            self.norms.append(face.norm)
            self.boxes.append(face.box)
            self.landmarks.append(face.landmarks)
            self.scores.append(face.score)

    def arrays(self, meta: dict) -> dict:
        """The flat arrays written by `embed` (see the module docstring)."""
        import numpy as np

        n = len(self.sources)
        return {
            "embeddings": np.array(self.embeddings, np.float32).reshape(n, -1) if n else np.zeros((0, 512), np.float32),
            "norms": np.array(self.norms, np.float32),
            "boxes": np.array(self.boxes, np.float32).reshape(n, 4),
            "landmarks": np.array(self.landmarks, np.float32).reshape(n, 5, 2),
            "scores": np.array(self.scores, np.float32),
            "sources": np.array(self.sources, dtype=str),
            "face_index": np.array(self.face_index, np.int64),
            "files": np.array(self.files, dtype=str),
            "file_errors": np.array(self.file_errors, dtype=str),
            "file_num_faces": np.array(self.file_num_faces, np.int64),
            "meta": np.array(json.dumps(meta)),
        }


def run(args: argparse.Namespace) -> int:
    implicit_output = args.output is None
    if implicit_output:
        args.output = Path("embeddings.npz")
    suffix = args.output.suffix.lower()
    if suffix not in (".npz", ".parquet"):
        print(f"error: --output must end in .npz or .parquet, got {args.output}", file=sys.stderr)
        return 2
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            print("error: .parquet output needs pyarrow: pip install pyarrow  (or use .npz)", file=sys.stderr)
            return 2
    files = collect_images(args.paths)
    if not files:
        print(f"error: no image files found in {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from lvface_mm.models import WeightsNotAvailableError

    try:
        embedder = build_embedder(args)
    except (ValueError, ImportError, FileNotFoundError, WeightsNotAvailableError) as exc:
        print(f"error: {cli_terms(str(exc))}", file=sys.stderr)
        return 2

    table = FaceTable()
    stream = embedder.iter_embed([str(f) for f in files], assume_aligned=assume_aligned_flag(args.assume_aligned))
    try:
        bar = tqdm(stream, total=len(files), unit="img", disable=True if args.no_progress else None)
        for result in bar:
            table.add(result)
            if result.error:
                tqdm.write(f"skipped {result.source}: {cli_terms(result.error)}", file=sys.stderr)
            elif not result.faces:
                tqdm.write(f"no face in {result.source}", file=sys.stderr)
    except (ImportError, FileNotFoundError) as exc:  # e.g. the detector's extra is not installed
        print(f"error: {cli_terms(str(exc))}", file=sys.stderr)
        return 2
    failed = sum(1 for e in table.file_errors if e)
    if failed == len(files):  # nothing usable: write nothing rather than an empty table
        print(f"error: none of the {len(files)} input(s) could be read; nothing written", file=sys.stderr)
        return 2

    meta = {
        "model": "lvface_tiny (random)" if args.tiny else args.model,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "backend": args.backend,
        "detector": args.detector,
        "min_detection_score": args.min_detection_score,
        "landmark_check": args.landmark_check,
        "flip_test": args.flip,
        "dtype": args.dtype or "fp32",
    }
    arrays = table.arrays(meta)
    (write_parquet if suffix == ".parquet" else write_npz)(args.output, arrays)
    no_face = sum(1 for e, n in zip(table.file_errors, table.file_num_faces) if not e and not n)
    print(
        f"{len(arrays['embeddings'])} faces from {len(files) - failed} images "
        f"({no_face} without a face, {failed} failed) -> {args.output}"
    )
    if implicit_output:
        print(f"wrote {args.output.resolve()} (no -o given; choose the file with -o out.npz or out.parquet)",
              file=sys.stderr)
    return 1 if failed else 0
