"""`lvface-mm index PHOTOS... --db library.db`: find, embed and store every face, plus a CLIP
embedding per photo, so the collection can be searched by face, name and text.

Runs as a sharded job (see `lvface_mm.gallery.indexing`): the file list is cut into shards, workers
write one Parquet file per shard into `--shards` (default: `<db>.shards/`), and the shards are merged
into the database. Engines: `local` (default: one process per core), `inline`, `torchrun`
(`torchrun --nproc_per_node 8 -m lvface_mm index ... --engine torchrun`) and `ray`
(`--engine ray --address auto`).

Resumable: rerunning redoes only the shards that are missing (a killed worker's shard) and skips
content already in the database. Unreadable or missing files are listed and skipped; files that
failed before are listed again (and not retried without --retry-failed); they never count as indexed.

Exit status: 0 every file indexed or already indexed, 1 some files or shards failed (the rest is
indexed), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from .embed import add_model_arguments


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
    parser.add_argument("--faces-only", action="store_true", help="no CLIP: faces only (no text search)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    j = parser.add_argument_group("sharded job")
    j.add_argument("--engine", default="local", help="local (default), inline, torchrun or ray")
    j.add_argument("--workers", type=int, help="local/ray workers (default: one per CPU core)")
    j.add_argument("--shards", help="folder of the Parquet shards (default: <db>.shards)")
    j.add_argument("--shard-size", type=int, default=256, help="photos per shard (default 256)")
    j.add_argument("--address", help="--engine ray: the cluster to join (e.g. auto, ray://head:10001)")
    add_clip_arguments(parser)
    add_model_arguments(parser)


def encoder_spec(args: argparse.Namespace):  # noqa: ANN201 - EncoderSpec, imported lazily
    """The workers' recipe for their encoders, from `add_model_arguments` and CLIP options."""
    from lvface_mm.gallery.indexing import EncoderSpec

    if args.backend == "onnx" or args.flip or args.assume_aligned != "auto":
        raise ValueError("index takes --backend auto/torch and no --flip/--assume-aligned (whole photos)")
    return EncoderSpec(
        face_model=args.model, checkpoint=str(args.checkpoint) if args.checkpoint else None,
        tiny_seed=args.seed if args.tiny else None, detector=args.detector,
        detector_weights=str(args.detector_weights) if args.detector_weights else None, device=args.device,
        backend=args.backend, dtype=args.dtype, batch_size=args.batch_size, min_face_size=args.min_face_size,
        max_faces=args.max_faces, max_image_pixels=args.max_pixels, min_detection_score=args.min_detection_score,
        landmark_check=args.landmark_check, clip_model=None if args.faces_only else args.clip_model,
        clip_pretrained=args.clip_pretrained, tiny_clip_seed=args.seed if args.tiny and not args.faces_only else None)


def run(args: argparse.Namespace) -> int:
    from lvface_mm.gallery.index_job import run_index_job
    from lvface_mm.gallery.indexing import IndexJobConfig
    from lvface_mm.gallery.photos import PhotoIndex
    from lvface_mm.gallery.runners import list_engines
    from lvface_mm.gallery.shards import ShardError
    from lvface_mm.models import WeightsNotAvailableError

    options = {"address": args.address} if args.engine == "ray" and args.address else {}
    try:
        if args.engine not in list_engines():
            raise ValueError(f"--engine {args.engine!r}: expected one of {', '.join(list_engines())}")
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers {args.workers}: expected a positive integer")
        spec = encoder_spec(args)
        config = IndexJobConfig(args.db, args.shards or f"{args.db}.shards", args.shard_size, args.photo_batch,
                                args.retry_failed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(unit="shard", file=sys.stderr)
    try:
        report = run_index_job(args.photos, config, spec, engine=args.engine, workers=args.workers,
                               progress=(lambda o: bar.update(1)) if bar is not None else None, **options)
    except (ValueError, FileNotFoundError, WeightsNotAvailableError, ShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    if not report.merged:  # a torchrun rank other than 0: its shards are written, rank 0 merges and reports
        print(f"shards written; rank 0 merges them into {args.db}")
        return 0
    for path, reason in report.failed:
        print(f"failed {path}: {reason}", file=sys.stderr)
    for path, reason in report.failed_before:
        print(f"failed before {path}: {reason} (not retried; --retry-failed tries again)", file=sys.stderr)
    for shard, reason in report.shard_errors:
        print(f"shard error {shard}: {reason}", file=sys.stderr)
    with PhotoIndex(args.db) as index:
        total = len(index)
    print(f"indexed {report.indexed} photos ({report.faces} faces) in {report.seconds:.1f} s "
          f"({report.photos_per_second:.2f} photos/s); skipped {report.skipped} already indexed; "
          f"failed {len(report.failed) + len(report.failed_before)}; the index holds {total} photos")
    return 1 if report.failed or report.failed_before or report.shard_errors else 0
