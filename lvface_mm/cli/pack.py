"""`lvface-mm pack`: a folder-per-identity tree -> train.rec / train.idx (InsightFace layout).

    lvface-mm pack photos/ packed/                 detect, align and pack (needs a detector)
    lvface-mm pack crops/ packed/ --aligned        pack aligned 112x112 crops as they are

The output folder works as `RecordDataset("packed/")` and as arcface_torch's `config.rec`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="root/<identity>/<image> tree")
    parser.add_argument("output", type=Path, help="output folder for train.rec, train.idx, property, identities.tsv")
    parser.add_argument("--aligned", action="store_true",
                        help="images are aligned 112x112 crops: store them as they are, no detector needed")
    parser.add_argument("--detector", default="dlib", help="face detector for unaligned images (default: dlib)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for crops this command encodes")
    parser.add_argument("--plain", action="store_true",
                        help="write im2rec-style files (images only, no meta/identity records)")
    parser.add_argument("--min-images", type=int, default=1, help="skip identities with fewer images")
    parser.add_argument("--workers", type=int, default=4, help="threads reading/aligning images")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pack in OUTPUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.image_folder import list_identity_folder
    from ..data.pack import aligned_encoder, detecting_encoder, pack_identity_folder

    if not 1 <= args.quality <= 100:
        return _fail(f"--quality must be in 1..100, got {args.quality}")
    try:
        listing = list_identity_folder(args.source, min_images=args.min_images)
        print(f"{args.source}: {len(listing):,} images of {listing.num_classes:,} identities")
        if args.aligned:
            encoder = aligned_encoder(quality=args.quality)
        else:
            encoder = detecting_encoder(_detector(args.detector), quality=args.quality)
        result = pack_identity_folder(
            listing, args.output, encoder, insightface_layout=not args.plain, overwrite=args.overwrite,
            workers=args.workers, progress=not args.quiet,
        )
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        return _fail(str(exc))
    print(f"wrote {result.rec_path} and {result.idx_path}: {result.num_images:,} images, "
          f"{result.num_classes:,} identities")
    if result.skipped:
        print(f"skipped {len(result.skipped):,} images:", file=sys.stderr)
        for path, reason in result.skipped[:20]:
            print(f"  {path}: {reason}", file=sys.stderr)
        if len(result.skipped) > 20:
            print(f"  ... and {len(result.skipped) - 20:,} more", file=sys.stderr)
    return 0


class _OneAtATime:
    """A detector that several worker threads may share: calls go through one at a time. dlib's
    detectors are not thread-safe (four workers calling one crash the process with a segfault);
    reading, aligning and JPEG encoding stay parallel."""

    def __init__(self, detector: object) -> None:
        import threading

        self._detector, self._lock = detector, threading.Lock()

    def detect(self, image: object) -> object:
        with self._lock:
            return self._detector.detect(image)


def _detector(name: str) -> object:
    try:
        from ..faces.detection import create_detector
    except ImportError as exc:
        raise RuntimeError(
            f"aligning images needs lvface_mm.faces detection ({exc}); pack already aligned crops with --aligned"
        ) from exc
    try:
        return _OneAtATime(create_detector(name))
    except ImportError as exc:
        raise RuntimeError(
            f"detector {name!r} is not available ({exc}); install the [detect] extra, choose another --detector, "
            "or pack already aligned crops with --aligned"
        ) from exc


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
