"""`lvface-mm search`: query an indexed photo collection.

    lvface-mm search "Alice at the beach" --db library.db     # names from the gallery in the same file
    lvface-mm search "sunset over water" --db library.db       # text only (CLIP)
    lvface-mm search --face someone.jpg --db library.db        # everyone who looks like this face
    lvface-mm search --name Alice --db library.db

Prints one line per photo: score, path, and the names found on it (or JSON lines with --json).
Exit status: 0 results, 1 no result, 2 bad arguments.

Face search, text search (CLIP) and the names from the gallery use on-disk indexes kept beside the
database, `<db>.faces.idx/`, `<db>.clip.idx/` and `<gallery>.people.idx/`: memory-mapped at start
and caught up with what changed since the last run; a missing or damaged one is rebuilt with a
one-line warning. `--no-disk-index` searches in-memory indexes built at every start instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator

from .embed import add_model_arguments, build_embedder
from .index import add_clip_arguments, build_clip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="?", default="", help='free text with enrolled names: "Alice at the beach"')
    parser.add_argument("--db", required=True, help="database made by `lvface-mm index` (and `gallery enrol`)")
    parser.add_argument("--gallery", help="gallery file, if not the same as --db")
    parser.add_argument("--face", help="find photos of the (largest) face in this photo")
    parser.add_argument("--name", help="find photos of this enrolled person")
    parser.add_argument("-k", type=int, default=20, help="number of photos (default 20)")
    parser.add_argument("--min-score", type=float, help="--face: keep faces at least this similar")
    parser.add_argument("--json", action="store_true", help="JSON lines output")
    parser.add_argument("--no-disk-index", action="store_true",
                        help="build in-memory indexes at every start instead of keeping <db>.faces.idx/, "
                             "<db>.clip.idx/ and <gallery>.people.idx/")
    add_clip_arguments(parser)
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lvface_mm.gallery import Gallery
    from lvface_mm.gallery.disk_index import IndexFileError
    from lvface_mm.gallery.photos import PhotoIndex
    from lvface_mm.models import WeightsNotAvailableError

    if sum(bool(x) for x in (args.query.strip(), args.face, args.name)) != 1:
        print("error: give exactly one of a QUERY, --face PHOTO or --name NAME", file=sys.stderr)
        return 2
    model = "lvface_tiny" if args.tiny else args.model
    disk = False if args.no_disk_index else None
    try:
        embedder = build_embedder(args) if args.face else None
        clip = build_clip(args) if args.query.strip() else None
        with index_warnings_as_lines(), contextlib.ExitStack() as stack:
            index = stack.enter_context(PhotoIndex(args.db, embedder=embedder, clip=clip, face_model=model,
                                                   disk_index=disk))
            gallery = stack.enter_context(Gallery(args.gallery or args.db, model_name=model, disk_index=disk))
            if args.face:
                hits = index.search_by_face(args.face, args.k, min_score=args.min_score, gallery=gallery)
            elif args.name:
                hits = index.search_by_name(args.name, gallery, args.k)
            else:
                hits = index.search(args.query, gallery, args.k)
    except (ValueError, KeyError, FileNotFoundError, WeightsNotAvailableError, IndexFileError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    for hit in hits:
        names = [f.name for f in hit.faces if f.name]
        if args.json:
            faces = [{"box": f.box, "name": f.name, "similarity": f.similarity} for f in hit.faces]
            print(json.dumps({"path": hit.path, "score": round(hit.score, 4), "names": names, "faces": faces}))
        else:
            print(f"{hit.score:.3f}\t{hit.path}\t{', '.join(names)}")
    if not hits:
        print("no matching photo", file=sys.stderr)
    return 0 if hits else 1



@contextlib.contextmanager
def index_warnings_as_lines() -> Iterator[None]:
    """Show an on-disk index rebuilt (``IndexRebuiltWarning``, with why) as one ``warning:`` line on
    stderr instead of Python's two-line warning with a source line."""
    from lvface_mm.gallery.disk_sync import IndexRebuiltWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IndexRebuiltWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, IndexRebuiltWarning):
                    print(f"warning: {w.message}", file=sys.stderr)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
