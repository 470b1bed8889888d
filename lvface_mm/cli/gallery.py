"""`lvface-mm gallery`: enrol, list, rename, delete, identify, export/import and calibrate.

    lvface-mm gallery enrol Alice alice1.jpg alice2.jpg --db people.db
    lvface-mm gallery identify party.jpg --db people.db
    lvface-mm gallery list --db people.db
    lvface-mm gallery calibrate --folder lfw_like/ --far 1e-3 --save --db people.db

A gallery remembers the encoder it was made with (model, checkpoint file and its sha256, or the
seed of random `--tiny` weights): give the model flags once, at the first `enrol`; later commands
use the gallery's own encoder, and model flags that disagree with it are refused.

Exit status: 0 success, 1 some inputs failed (the rest was done), 2 bad arguments or nothing done.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ._common import cli_terms, note, progress
from .embed import add_model_arguments, assume_aligned_flag, build_embedder
from .search import index_warnings_as_lines

_ACTIONS = ("enrol", "list", "rename", "delete", "identify", "export", "import", "calibrate")
_CREATES = ("enrol", "import", "calibrate")  # the actions that may start a new gallery file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=_ACTIONS, metavar="ACTION",
                        help="enrol NAME PHOTO... | identify PHOTO... | list | rename OLD NEW | delete NAME | "
                        "export FILE.npz | import FILE.npz | calibrate (--folder DIR or --npz FILE)")
    parser.add_argument("items", nargs="*", default=[], metavar="ARG", help="the action's names, photos or file")
    parser.add_argument("--db", required=True, metavar="FILE", help="gallery database file (enrol, import and "
                        "calibrate --save create it; other actions need an existing gallery)")
    parser.add_argument("--threshold", type=float, help="acceptance threshold (cosine) for identify")
    parser.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="enrol: metadata")
    parser.add_argument("--replace", action="store_true", help="enrol: drop the person's earlier samples")
    parser.add_argument("--store-faces", action="store_true", help="enrol: also keep the aligned face crops")
    parser.add_argument("--on-conflict", choices=("error", "skip", "merge", "replace"), default="error",
                        help="import: what to do with names already enrolled")
    parser.add_argument("--folder", type=Path, metavar="DIR", help="calibrate: one sub-folder of photos per person")
    parser.add_argument("--npz", type=Path, metavar="FILE", help="calibrate: a .npz with arrays embeddings and labels")
    parser.add_argument("--far", type=float, default=1e-3, help="calibrate: target false-accept rate")
    parser.add_argument("--save", action="store_true", help="calibrate: store the threshold in the gallery")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--no-disk-index", action="store_true",
                        help="identify: search templates loaded into memory, not the index kept in <db>.people.idx/")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_model_arguments(parser, default_model=None)
    # None = "not given": the gallery's remembered encoder is used instead.
    parser.set_defaults(seed=None)


# ---------------------------------------------------------------- the remembered encoder
def _encoder_from_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    """The encoder the model flags ask for, or None when no model flag was given."""
    if not (args.tiny or args.model or args.checkpoint or args.seed is not None):
        return None
    if args.tiny:
        return {"model": "lvface_tiny", "tiny": True, "seed": args.seed or 0}
    from lvface_mm.models import get_model_spec

    spec = get_model_spec(args.model or "lvface_b")  # canonical name: aliases must not look like other models
    info: dict[str, Any] = {"model": spec.name}
    if args.checkpoint is not None:
        info.update(_checkpoint_identity(Path(args.checkpoint)))
    elif spec.weights is None:  # a registered variant without weights runs on seeded random weights
        info["seed"] = args.seed or 0
    return info


def _checkpoint_identity(path: Path) -> dict[str, Any]:
    from lvface_mm.models.pretrained import sha256_of

    if path.is_dir():
        raise ValueError(f"--checkpoint {path} is a folder; give the .pt or .safetensors file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    return {"checkpoint": str(path.resolve()), "checkpoint_sha256": sha256_of(path)}


def _describe(info: dict[str, Any]) -> str:
    if info.get("tiny"):
        return f"--tiny --seed {info.get('seed', 0)}"
    out = f"--model {info['model']}"
    if info.get("checkpoint"):
        out += f" --checkpoint {info['checkpoint']}"
    elif "seed" in info:
        out += f" (random weights, --seed {info['seed']})"
    return out


def _same_encoder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("model", "tiny", "seed", "checkpoint_sha256")  # the checkpoint may move; its bytes may not
    return all(a.get(k) == b.get(k) for k in keys)


def _stored_encoder(db: str) -> tuple[dict[str, Any] | None, str | None]:
    """(remembered encoder, model name) of an existing gallery; (None, None) for a new one."""
    from lvface_mm.gallery import Gallery

    if not Path(db).is_file():
        return None, None
    try:
        gallery = Gallery(db, create=False)
    except FileNotFoundError:  # a file without a gallery yet (e.g. a photo index): enrol adds one
        return None, None
    with gallery:
        return gallery.encoder, gallery.model_name


def _resolve_encoder(args: argparse.Namespace) -> dict[str, Any]:
    """The encoder this command runs: the gallery's own, checked against any model flags given.
    Sets args.model/tiny/seed/checkpoint accordingly, for `build_embedder`."""
    asked = _encoder_from_flags(args)
    stored, stored_model = _stored_encoder(args.db)
    if stored is None and stored_model is not None:  # made by the library or an older CLI: name only
        stored = {"model": "lvface_tiny", "tiny": True, "seed": 0} if stored_model == "lvface_tiny" \
            else {"model": stored_model}
        if asked is not None and asked["model"] == stored_model:
            stored = asked  # the name is all we can check
    if stored is not None and asked is not None and not _same_encoder(stored, asked):
        raise ValueError(f"gallery {args.db} was made with {_describe(stored)}, but this command asks for "
                         f"{_describe(asked)}: embeddings of different encoders are not comparable. Leave out "
                         "the model flags to use the gallery's own encoder, or pass another --db")
    info = asked or stored or {"model": "lvface_b"}  # flags that agree may point at a moved checkpoint
    if info.get("checkpoint") and asked is None:
        _check_remembered_checkpoint(args.db, info)
    args.tiny, args.model = bool(info.get("tiny")), info["model"]
    args.seed = int(info.get("seed", 0))
    args.checkpoint = Path(info["checkpoint"]) if info.get("checkpoint") else None
    return info


def _check_remembered_checkpoint(db: str, info: dict[str, Any]) -> None:
    path = Path(info["checkpoint"])
    if not path.is_file() or _checkpoint_identity(path)["checkpoint_sha256"] != info.get("checkpoint_sha256"):
        state = "is no longer there" if not path.is_file() else "has changed since"
        raise ValueError(f"gallery {db} was made with checkpoint {path} (sha256 {info.get('checkpoint_sha256')}), "
                         f"which {state}; pass --checkpoint FILE with that same file")


def _open(args: argparse.Namespace, model: str | None = None, store_faces: bool = False) -> Any:
    from lvface_mm.gallery import Gallery

    if model is None and (args.tiny or args.model):
        model = "lvface_tiny" if args.tiny else args.model
    try:
        return Gallery(args.db, threshold=args.threshold, model_name=model, store_face_images=store_faces,
                       create=args.action in _CREATES, disk_index=False if args.no_disk_index else None)
    except FileNotFoundError as exc:
        if args.action in _CREATES:
            raise
        raise FileNotFoundError(f"{exc} (check --db; `gallery enrol` or `gallery import` creates a gallery)") \
            from exc


# ---------------------------------------------------------------- actions
def _metadata(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--meta {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _embed_all(args: argparse.Namespace, photos: list[str], desc: str) -> Any:
    embedder = build_embedder(args)
    stream = embedder.iter_embed(photos, assume_aligned=assume_aligned_flag(args.assume_aligned))
    yield from progress(stream, total=len(photos), desc=desc, quiet=args.quiet)


def _enrol(args: argparse.Namespace) -> int:
    if len(args.items) < 2:
        raise ValueError("enrol needs a name and at least one photo: gallery enrol NAME PHOTO...")
    name, photos = args.items[0], args.items[1:]
    metadata = _metadata(args.meta)
    encoder = _resolve_encoder(args)
    embeddings, qualities, crops, failed = [], [], [], 0
    for result in _embed_all(args, photos, f"enrol {name}"):
        try:
            face = result.main_face()
        except ValueError as exc:
            note(f"skipped {cli_terms(str(exc))}")
            failed += 1
            continue
        embeddings.append(face.embedding)
        qualities.append(max(face.norm, 1e-6))  # the raw feature norm is a face-quality proxy
        crops.append(face.crop)
    if not embeddings:  # nothing usable: the gallery file is not created or touched
        print(f"nothing enrolled for {name!r}: no usable face in {len(photos)} photo(s)", file=sys.stderr)
        return 2
    import numpy as np

    with _open(args, model=encoder["model"], store_faces=args.store_faces) as gallery:
        if gallery.encoder is None:
            gallery.remember_encoder(encoder)
        identity_id = gallery.enrol(name, np.stack(embeddings), quality=qualities, metadata=metadata,
                                    face_images=crops if args.store_faces else None, replace=args.replace)
        person = gallery.get(identity_id)
    print(f"enrolled {person.name} (id {identity_id}) from {len(embeddings)} photo(s); "
          f"{person.num_samples} sample(s) in total")
    return 1 if failed else 0


def _identify(args: argparse.Namespace) -> int:
    if not args.items:
        raise ValueError("identify needs at least one photo")
    with _open(args):  # an existing gallery first: a mistyped --db fails before the model loads
        pass
    encoder = _resolve_encoder(args)
    rows, failed = [], 0
    with index_warnings_as_lines(), _open(args, model=encoder["model"]) as gallery:
        for result in _embed_all(args, list(args.items), "identify"):
            if result.error is not None:
                note(f"{result.source}: {cli_terms(result.error)}")
                failed += 1
                continue
            found = gallery.identify(result.embeddings) if result.faces else []
            for face, who in zip(result.faces, found):
                rows.append({"source": result.source, "box": [round(float(v), 1) for v in face.box],
                             "name": who.name, "score": round(who.score, 4), "identity_id": who.identity_id})
            if not result.faces:
                note(f"{result.source}: no face found")
    for row in rows:
        print(json.dumps(row) if args.json else
              f"{row['source']}\t{row['box']}\t{row['name'] or 'unknown'}\t{row['score']:.3f}")
    if failed == len(args.items):
        return 2
    return 1 if failed else 0


def _calibration_data(args: argparse.Namespace) -> tuple[Any, Any]:
    import numpy as np

    if args.npz is not None:
        with np.load(args.npz, allow_pickle=False) as data:
            if "embeddings" not in data or "labels" not in data:
                raise ValueError(f"{args.npz}: expected arrays 'embeddings' and 'labels', found {list(data)}")
            return data["embeddings"], data["labels"]
    from lvface_mm.gallery.photos import find_images

    people = sorted(p for p in args.folder.iterdir() if p.is_dir())
    if len(people) < 2:
        raise ValueError(f"{args.folder}: need at least two sub-folders (one per person)")
    files = [(person.name, str(path)) for person in people for path in find_images([person])]
    x_list, y_list = [], []
    for (label, _), result in zip(files, _embed_all(args, [f for _, f in files], "calibrate")):
        if result.faces:
            x_list.append(result.main_face().embedding)
            y_list.append(label)
        else:
            note(f"skipped {result.source}: {cli_terms(result.error or 'no face found')}")
    if not x_list:
        raise ValueError(f"{args.folder}: no usable face in {len(files)} photo(s)")
    return np.stack(x_list), np.array(y_list)


def _calibrate(args: argparse.Namespace) -> int:
    from lvface_mm.gallery import calibrate

    if (args.folder is None) == (args.npz is None):
        raise ValueError("calibrate needs exactly one of --folder (a sub-folder per person) or --npz")
    encoder = _resolve_encoder(args) if args.folder is not None else None
    x, y = _calibration_data(args)
    cal = calibrate(x, y, far=args.far)
    print(json.dumps(cal.__dict__) if args.json else
          f"threshold {cal.threshold:.4f} at FAR {cal.far:.2e} (target {cal.target_far:g}; "
          f"{cal.num_impostor} impostor / {cal.num_genuine} genuine pairs)"
          + (f", TAR {cal.tar:.4f}" if cal.tar is not None else ""))
    if args.save:
        with _open(args) as gallery:
            if encoder is not None and gallery.encoder is None:  # the threshold belongs to this encoder
                gallery.remember_encoder(encoder)
            gallery.save_threshold(cal.threshold, far=cal.far, source=f"calibrated on {args.folder or args.npz}")
        print(f"saved in {args.db}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _import(args: argparse.Namespace, gallery: Any) -> None:
    from lvface_mm.gallery.store import NameConflictError

    try:
        ids = gallery.import_(args.items[0], on_conflict=args.on_conflict)
    except NameConflictError as exc:
        raise ValueError(f"{args.items[0]}: {len(exc.names)} name(s) already in {args.db}: {', '.join(exc.names)}. "
                         "Nothing was imported. Rerun with --on-conflict skip (keep the enrolled ones), merge (add "
                         "the file's samples to them) or replace (use the file's samples instead)") from None
    print(f"imported {len(ids)} {'person' if len(ids) == 1 else 'people'}")


def _manage(args: argparse.Namespace) -> int:
    """list, rename, delete, export, import: no model needed, only the gallery."""
    counts = {"rename": 2, "delete": 1, "export": 1, "import": 1}
    usage = {"rename": "OLD NEW", "delete": "NAME", "export": "an output FILE.npz", "import": "a FILE.npz"}
    if args.action in counts and len(args.items) != counts[args.action]:
        raise ValueError(f"{args.action} needs {usage[args.action]}")
    if args.action != "import" and (args.tiny or args.model or args.checkpoint):
        _resolve_encoder(args)  # flags were given: refuse them when they are not the gallery's
    with _open(args) as gallery:
        if args.action == "list":
            people = gallery.list_identities()
            for p in people:
                print(json.dumps(p.__dict__) if args.json else f"{p.identity_id}\t{p.name}\t{p.num_samples}")
            if not args.json:
                print(f"{len(people)} people, threshold {gallery.threshold:.3f}", file=sys.stderr)
        elif args.action == "rename":
            gallery.rename(args.items[0], args.items[1])
            print(f"renamed {args.items[0]} to {args.items[1]}")
        elif args.action == "delete":
            print(f"deleted {args.items[0]} (id {gallery.delete(args.items[0])})")
        elif args.action == "export":
            print(f"exported {len(gallery)} people to {gallery.export(args.items[0])}")
        else:
            _import(args, gallery)
    return 0


def run(args: argparse.Namespace) -> int:
    from lvface_mm.models.pretrained import WeightsNotAvailableError

    try:
        if args.action == "enrol":
            return _enrol(args)
        if args.action == "identify":
            return _identify(args)
        if args.action == "calibrate":
            return _calibrate(args)
        return _manage(args)
    except (ValueError, KeyError, OSError, WeightsNotAvailableError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {cli_terms(message)}", file=sys.stderr)
        return 2
