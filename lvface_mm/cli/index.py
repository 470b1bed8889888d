"""`lvface-mm index PHOTOS... --db library.db`: find, embed and store every face, plus a CLIP
embedding per photo, so the collection can be searched by face, name and text.

Resumable: rerunning skips every file already indexed (by content hash); stopping or killing it
loses at most the photo being written. Unreadable files are reported, recorded and skipped.

Exit status: 0 all files indexed or skipped, 1 some files failed (the rest is indexed), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from .embed import add_model_arguments, build_embedder


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("CLIP (photo content)")
    g.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    g.add_argument("--clip-pretrained", default="laion2b_s34b_b79k",
                   help="open_clip weights: a tag (default laion2b_s34b_b79k) or a local checkpoint file")


def build_clip(args: argparse.Namespace):  # noqa: ANN201 - ClipEncoder, imported lazily
    from lvface_mm.gallery.clip import ClipConfig, ClipEncoder

    if args.tiny:
        return ClipEncoder.tiny(seed=args.seed)
    return ClipEncoder.from_pretrained(ClipConfig(args.clip_model, args.clip_pretrained))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--db", required=True, help="index database (may be the gallery's file)")
    parser.add_argument("--retry-failed", action="store_true", help="try files that failed before again")
    parser.add_argument("--photo-batch", type=int, default=8, help="photos decoded and embedded together")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_clip_arguments(parser)
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lvface_mm.gallery.photos import PhotoIndex
    from lvface_mm.models import WeightsNotAvailableError

    try:
        embedder, clip = build_embedder(args), build_clip(args)
        index = PhotoIndex(args.db, embedder=embedder, clip=clip, face_model="lvface_tiny" if args.tiny else args.model)
    except (ValueError, FileNotFoundError, WeightsNotAvailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(unit="photo", file=sys.stderr)

    def progress(p) -> None:  # noqa: ANN001 - IndexProgress
        bar.total = p.total
        bar.update(1)
        bar.set_postfix_str(p.status)

    try:
        report = index.add(args.photos, batch_size=args.photo_batch, progress=progress if bar is not None else None,
                           retry_failed=args.retry_failed)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    for path, reason in report.failed:
        print(f"failed {path}: {reason}", file=sys.stderr)
    print(f"indexed {report.indexed} photos ({report.faces} faces) in {report.seconds:.1f} s "
          f"({report.photos_per_second:.2f} photos/s); skipped {report.skipped} already indexed; "
          f"failed {len(report.failed)}; the index holds {len(index)} photos")
    index.close()
    return 1 if report.failed else 0
