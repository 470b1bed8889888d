"""`lvface-mm verify A B`: cosine similarity of the main (largest) face of two images, and a
same / different decision at a threshold.

    lvface-mm verify alice1.jpg alice2.jpg
    lvface-mm verify a.jpg b.jpg --threshold 0.5 --json

The default threshold, 0.35, is not an LVFace number: the LVFace release publishes none. It is the
low end of the 0.35-0.6 cosine range that downstream projects pick ad hoc for LVFace (see
docs/faces.md), so it errs towards calling two faces the same. It has not been calibrated here
(no official weights are available offline): for decisions that matter, calibrate a threshold at
your false-accept rate on your own data (the gallery tools do this). With random weights
(`--tiny`) the decision means nothing.

Exit status: 0 compared, 1 an image could not be used (unreadable, no face), 2 bad options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._common import cli_terms
from .embed import add_model_arguments, assume_aligned_flag, build_embedder

DEFAULT_THRESHOLD = 0.35


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image_a", type=Path)
    parser.add_argument("image_b", type=Path)
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"cosine similarity at or above which the faces are called the same person (default "
        f"{DEFAULT_THRESHOLD}: an uncalibrated rule of thumb, see docs/faces.md)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_model_arguments(parser)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Report an error; with --json also on stdout as a JSON object, so a script always gets one."""
    message = cli_terms(message)
    print(f"error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"a": str(args.image_a), "b": str(args.image_b), "error": message, "exit_status": code}))
    return code


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from lvface_mm.models import WeightsNotAvailableError

    if not -1.0 <= args.threshold <= 1.0:
        return _fail(args, f"--threshold is a cosine similarity in [-1, 1], got {args.threshold}", 2)
    try:
        embedder = build_embedder(args)
        results = embedder.embed(
            [str(args.image_a), str(args.image_b)], assume_aligned=assume_aligned_flag(args.assume_aligned)
        )
    except (ValueError, ImportError, OSError, WeightsNotAvailableError) as exc:
        return _fail(args, str(exc), 2)
    faces = []
    for result in results:
        try:
            faces.append(result.main_face())
        except ValueError as exc:
            return _fail(args, str(exc), 1)
    similarity = float(np.dot(faces[0].embedding, faces[1].embedding))
    same = similarity >= args.threshold
    random_weights = args.tiny or (args.checkpoint is None and args.model == "lvface_tiny")
    if args.json:
        record = {
            "a": str(args.image_a),
            "b": str(args.image_b),
            "similarity": similarity,
            "threshold": args.threshold,
            "same": same,
            "faces": [len(r.faces) for r in results],
            "boxes": [f.box.round(1).tolist() for f in faces],
            "random_weights": random_weights,
        }
        print(json.dumps(record))
        return 0
    for label, result, face in zip("AB", results, faces):
        note = f" (largest of {len(result.faces)} faces)" if len(result.faces) > 1 else ""
        print(f"{label}: {result.source}  face box {face.box.round(1).tolist()}{note}")
    print(f"cosine similarity: {similarity:.4f}")
    verdict = "same person" if same else "different people"
    print(f"{verdict} (threshold {args.threshold:g}; uncalibrated default, see docs/faces.md)")
    if random_weights:
        print("note: random weights (--tiny): the similarity and decision mean nothing", file=sys.stderr)
    return 0
