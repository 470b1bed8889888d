"""`lvface-mm gallery`: enrol, list, rename, delete, identify, export/import and calibrate.

    lvface-mm gallery enrol Alice alice1.jpg alice2.jpg --db people.db
    lvface-mm gallery identify party.jpg --db people.db
    lvface-mm gallery list --db people.db
    lvface-mm gallery calibrate --folder lfw_like/ --far 1e-3 --save --db people.db

Exit status: 0 success, 1 some inputs failed (the rest was done), 2 bad arguments or nothing done.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .embed import add_model_arguments, build_embedder

_ACTIONS = ("enrol", "list", "rename", "delete", "identify", "export", "import", "calibrate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=_ACTIONS, help="what to do")
    parser.add_argument("items", nargs="*", help="enrol: NAME PHOTO...; rename: OLD NEW; delete: NAME; "
                        "identify: PHOTO...; export/import: FILE.npz")
    parser.add_argument("--db", required=True, help="gallery database file (created if missing)")
    parser.add_argument("--threshold", type=float, help="acceptance threshold (cosine) for identify")
    parser.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="enrol: metadata")
    parser.add_argument("--replace", action="store_true", help="enrol: drop the person's earlier samples")
    parser.add_argument("--store-faces", action="store_true", help="enrol: also keep the aligned face crops")
    parser.add_argument("--on-conflict", choices=("error", "skip", "merge", "replace"), default="error",
                        help="import: what to do with names already enrolled")
    parser.add_argument("--folder", type=Path, help="calibrate: one sub-folder of photos per person")
    parser.add_argument("--npz", type=Path, help="calibrate: a file with arrays `embeddings` and `labels`")
    parser.add_argument("--far", type=float, default=1e-3, help="calibrate: target false-accept rate")
    parser.add_argument("--save", action="store_true", help="calibrate: store the threshold in the gallery")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_model_arguments(parser)


def _model_name(args: argparse.Namespace) -> str:
    return "lvface_tiny" if args.tiny else args.model


def _open(args: argparse.Namespace, store_faces: bool = False):  # noqa: ANN202 - Gallery, imported lazily
    from lvface_mm.gallery import Gallery

    return Gallery(args.db, threshold=args.threshold, model_name=_model_name(args), store_face_images=store_faces)


def _metadata(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--meta {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _enrol(args: argparse.Namespace) -> int:
    if len(args.items) < 2:
        raise ValueError("enrol needs a name and at least one photo: gallery enrol NAME PHOTO...")
    name, photos = args.items[0], args.items[1:]
    embedder = build_embedder(args)
    embeddings, qualities, crops, failed = [], [], [], 0
    for result in embedder.embed(photos, assume_aligned=None if args.assume_aligned == "auto"
                                 else args.assume_aligned == "yes"):
        try:
            face = result.main_face()
        except ValueError as exc:
            print(f"skipped {exc}", file=sys.stderr)
            failed += 1
            continue
        embeddings.append(face.embedding)
        qualities.append(max(face.norm, 1e-6))  # the raw feature norm is a face-quality proxy
        crops.append(face.crop)
    if not embeddings:
        print(f"nothing enrolled for {name!r}: no usable face in {len(photos)} photo(s)", file=sys.stderr)
        return 2
    import numpy as np

    with _open(args, store_faces=args.store_faces) as gallery:
        identity_id = gallery.enrol(name, np.stack(embeddings), quality=qualities, metadata=_metadata(args.meta),
                                    face_images=crops if args.store_faces else None, replace=args.replace)
        person = gallery.get(identity_id)
    print(f"enrolled {person.name} (id {identity_id}) from {len(embeddings)} photo(s); "
          f"{person.num_samples} sample(s) in total")
    return 1 if failed else 0


def _identify(args: argparse.Namespace) -> int:
    if not args.items:
        raise ValueError("identify needs at least one photo")
    embedder = build_embedder(args)
    rows, failed = [], 0
    with _open(args) as gallery:
        for result in embedder.embed(args.items):
            if result.error is not None:
                print(f"{result.source}: {result.error}", file=sys.stderr)
                failed += 1
                continue
            found = gallery.identify(result.embeddings) if result.faces else []
            for face, who in zip(result.faces, found):
                rows.append({"source": result.source, "box": [round(float(v), 1) for v in face.box],
                             "name": who.name, "score": round(who.score, 4), "identity_id": who.identity_id})
            if not result.faces:
                print(f"{result.source}: no face found", file=sys.stderr)
    for row in rows:
        print(json.dumps(row) if args.json else
              f"{row['source']}\t{row['box']}\t{row['name'] or 'unknown'}\t{row['score']:.3f}")
    return 1 if failed else 0


def _calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from lvface_mm.gallery import calibrate

    if (args.folder is None) == (args.npz is None):
        raise ValueError("calibrate needs exactly one of --folder (a sub-folder per person) or --npz")
    if args.npz is not None:
        with np.load(args.npz, allow_pickle=False) as data:
            if "embeddings" not in data or "labels" not in data:
                raise ValueError(f"{args.npz}: expected arrays 'embeddings' and 'labels', found {list(data)}")
            x, y = data["embeddings"], data["labels"]
    else:
        from lvface_mm.gallery.photos import find_images

        embedder = build_embedder(args)
        people = sorted(p for p in args.folder.iterdir() if p.is_dir())
        if len(people) < 2:
            raise ValueError(f"{args.folder}: need at least two sub-folders (one per person)")
        x_list, y_list = [], []
        for person in people:
            for result in embedder.embed(find_images([person])):
                if result.faces:
                    x_list.append(result.main_face().embedding)
                    y_list.append(person.name)
                else:
                    print(f"skipped {result.source}: {result.error or 'no face found'}", file=sys.stderr)
        x, y = np.stack(x_list), np.array(y_list)
    cal = calibrate(x, y, far=args.far)
    print(json.dumps(cal.__dict__) if args.json else
          f"threshold {cal.threshold:.4f} at FAR {cal.far:.2e} (target {cal.target_far:g}; "
          f"{cal.num_impostor} impostor / {cal.num_genuine} genuine pairs)"
          + (f", TAR {cal.tar:.4f}" if cal.tar is not None else ""))
    if args.save:
        with _open(args) as gallery:
            gallery.save_threshold(cal.threshold, far=cal.far, source=f"calibrated on {args.folder or args.npz}")
        print(f"saved in {args.db}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "enrol":
            return _enrol(args)
        if args.action == "identify":
            return _identify(args)
        if args.action == "calibrate":
            return _calibrate(args)
        with _open(args) as gallery:
            if args.action == "list":
                people = gallery.list_identities()
                for p in people:
                    print(json.dumps(p.__dict__) if args.json else f"{p.identity_id}\t{p.name}\t{p.num_samples}")
                if not args.json:
                    print(f"{len(people)} people, threshold {gallery.threshold:.3f}", file=sys.stderr)
            elif args.action == "rename":
                if len(args.items) != 2:
                    raise ValueError("rename needs OLD NEW")
                gallery.rename(args.items[0], args.items[1])
                print(f"renamed {args.items[0]} to {args.items[1]}")
            elif args.action == "delete":
                if len(args.items) != 1:
                    raise ValueError("delete needs exactly one NAME")
                print(f"deleted {args.items[0]} (id {gallery.delete(args.items[0])})")
            elif args.action == "export":
                if len(args.items) != 1:
                    raise ValueError("export needs one output FILE.npz")
                print(f"exported {len(gallery)} people to {gallery.export(args.items[0])}")
            elif args.action == "import":
                if len(args.items) != 1:
                    raise ValueError("import needs one FILE.npz")
                print(f"imported {len(gallery.import_(args.items[0], on_conflict=args.on_conflict))} people")
        return 0
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
