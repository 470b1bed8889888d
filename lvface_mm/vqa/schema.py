"""Identity-grounded VQA samples: a LLaVA-style conversation JSON plus the faces it talks about.

One sample, as stored on disk (a JSON list of these, or JSON Lines):

    {
      "id": "eval-000042",
      "task": "naming",
      "images": ["scenes/eval-000042.jpg"],                     # optional scene photo(s)
      "faces": [
        {"identity": "id_0007", "name": "Alice", "photo": "id_0007/3.png",
         "crop": "crops/id_0007/3.png", "embedding": 12,         # any of crop / embedding / image+box
         "image": 0, "box": [8, 8, 120, 120], "landmarks": [[46.3, 59.7], ...]},
        ...
      ],
      "conversations": [
        {"from": "human", "value": "Faces from left to right: <face> <face>. Who is on the left?"},
        {"from": "gpt", "value": "Alice."}
      ],
      "target": {"names": ["Alice"]}
    }

Faces are referred to in the text either by bare `<face>` (the k-th occurrence is face k, so the
count must equal the number of faces) or by `<face_i>` (any face, any number of times). The two
styles are not mixed in one sample. Every face must be referenced and only user/system turns may
reference faces, so the model never has to emit a placeholder.

A face locates its pixels by one of: `crop` (an aligned 112x112 crop), `image` (index into
`images` or a path) with `landmarks` (5 points, aligned by the ArcFace template) and/or `box`,
or `embedding` (row of the dataset's precomputed embedding table). `identity` is the source label
used for split checks; `name` is what a model should say, or null for a person it must not name.

`target` carries what the evaluation harness scores, per task (see `TARGET_FIELDS`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FACE_TOKEN = "<face>"
# `<face>` or `<face_3>`; anything else that looks like a face tag is a typo we want to report.
FACE_REF_RE = re.compile(r"<face(?:_(\d+))?>")
_FACE_LIKE_RE = re.compile(r"<\s*face[^>]*>", re.IGNORECASE)

# LLaVA writes "human"/"gpt"; chat templates want "user"/"assistant". Both are accepted on read.
ROLE_ALIASES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_LLAVA_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}

# task -> target fields it must carry (name, type).
TARGET_FIELDS: dict[str, tuple[tuple[str, type | tuple[type, ...]], ...]] = {
    "recognition": (("query", str), ("answer", str)),  # answer "yes" | "no"
    "naming": (("names", list),),  # expected name(s), in the order asked
    "caption": (("names", list), ("num_unknown", int)),  # known names present, unknown people present
    "counting": (("count", int),),
    "unknown": (),  # the asked-about person must not be named
    "text_qa": (("answer", str),),
    "region": (("answer", str),),  # identity + picture ("What is Koren holding?"), scenes.py
    "other": (),
}
TASKS = tuple(TARGET_FIELDS)

_KNOWN_SAMPLE_KEYS = {"id", "task", "image", "images", "image_size", "faces", "conversations", "target", "meta"}
_KNOWN_FACE_KEYS = {"identity", "name", "photo", "crop", "embedding", "image", "box", "landmarks"}
_KNOWN_TURN_KEYS = {"from", "value", "role", "content"}


class VQAValidationError(ValueError):
    """One or more samples are malformed. `errors` lists (sample id, field, message)."""

    def __init__(self, errors: Sequence[tuple[str, str, str]], source: str = "") -> None:
        self.errors = list(errors)
        where = f" in {source}" if source else ""
        shown = "\n".join(f"  sample {sid!r}, field {fld!r}: {msg}" for sid, fld, msg in self.errors[:20])
        more = f"\n  ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
        super().__init__(f"{len(self.errors)} invalid VQA sample field(s){where}:\n{shown}{more}")


@dataclass(frozen=True)
class Face:
    identity: str | None = None
    name: str | None = None
    photo: str | None = None
    crop: str | None = None
    embedding: int | None = None
    image: int | str | None = None
    box: tuple[float, float, float, float] | None = None
    landmarks: tuple[tuple[float, float], ...] | None = None

    @property
    def center_x(self) -> float | None:
        return None if self.box is None else (self.box[0] + self.box[2]) / 2

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("identity", "name", "photo", "crop", "embedding", "image"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.box is not None:
            out["box"] = list(self.box)
        if self.landmarks is not None:
            out["landmarks"] = [list(p) for p in self.landmarks]
        # `name: null` is meaningful (a person the model must not name) when the identity is known.
        if self.name is None and self.identity is not None:
            out["name"] = None
        return out


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str


@dataclass(frozen=True)
class Sample:
    id: str
    task: str
    faces: tuple[Face, ...]
    turns: tuple[Turn, ...]
    images: tuple[str, ...] = ()
    target: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    # (width, height) of the picture the faces' boxes live on; the scene image's own size when
    # `images` is given, else a virtual canvas (face-only samples, built from crops).
    image_size: tuple[int, int] | None = None

    # -- views used by training and evaluation -----------------------------------------------------
    def face_order(self) -> list[int]:
        """Face index behind each placeholder, in reading order over all turns."""
        order: list[int] = []
        bare = 0
        for turn in self.turns:
            for m in FACE_REF_RE.finditer(turn.text):
                if m.group(1) is None:
                    order.append(bare)
                    bare += 1
                else:
                    order.append(int(m.group(1)))
        return order

    def messages(self, upto: int | None = None) -> list[dict[str, str]]:
        """Chat messages with every face reference written as the plain `<face>` placeholder.

        `upto` keeps only the first `upto` turns (the prompt of an evaluation sample is
        `messages(len(turns) - 1)`).
        """
        turns = self.turns if upto is None else self.turns[:upto]
        return [{"role": t.role, "content": FACE_REF_RE.sub(FACE_TOKEN, t.text)} for t in turns]

    def prompt_face_order(self) -> list[int]:
        """Face order of the prompt only (all turns but the final assistant answer)."""
        return Sample(self.id, self.task, self.faces, self.turns[:-1]).face_order()

    @property
    def answer(self) -> str:
        """Reference text of the final assistant turn."""
        return self.turns[-1].text

    def names_present(self) -> list[str]:
        return [f.name for f in self.faces if f.name]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "task": self.task}
        if self.images:
            out["images"] = list(self.images)
        if self.image_size is not None:
            out["image_size"] = list(self.image_size)
        out["faces"] = [f.to_dict() for f in self.faces]
        out["conversations"] = [{"from": _LLAVA_ROLE[t.role], "value": t.text} for t in self.turns]
        if self.target:
            out["target"] = dict(self.target)
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


# -- parsing and validation ----------------------------------------------------------------------


class _Errors:
    def __init__(self, sample_id: str) -> None:
        self.sample_id = sample_id
        self.items: list[tuple[str, str, str]] = []

    def add(self, field_name: str, message: str) -> None:
        self.items.append((self.sample_id, field_name, message))


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_face(raw: object, i: int, num_images: int, err: _Errors) -> Face | None:
    where = f"faces[{i}]"
    if not isinstance(raw, Mapping):
        err.add(where, f"expected an object, got {type(raw).__name__}")
        return None
    for key in sorted(set(raw) - _KNOWN_FACE_KEYS):
        err.add(f"{where}.{key}", f"unknown field; expected one of {sorted(_KNOWN_FACE_KEYS)}")
    strings = {}
    for key in ("identity", "name", "photo", "crop"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            err.add(f"{where}.{key}", f"expected a non-empty string or null, got {value!r}")
            value = None
        strings[key] = value
    embedding = raw.get("embedding")
    if embedding is not None and (not isinstance(embedding, int) or isinstance(embedding, bool) or embedding < 0):
        err.add(f"{where}.embedding", f"expected a row index (int >= 0), got {embedding!r}")
        embedding = None
    image = raw.get("image")
    if image is not None:
        if isinstance(image, int) and not isinstance(image, bool):
            if not 0 <= image < num_images:
                err.add(f"{where}.image", f"index {image} out of range: the sample lists {num_images} image(s)")
                image = None
        elif not (isinstance(image, str) and image.strip()):
            err.add(f"{where}.image", f"expected an index into `images` or a path, got {image!r}")
            image = None
    box = raw.get("box")
    if box is not None:
        if not (isinstance(box, Sequence) and len(box) == 4 and all(_is_number(v) for v in box)):
            err.add(f"{where}.box", f"expected [x1, y1, x2, y2] of finite numbers, got {box!r}")
            box = None
        elif not (box[2] > box[0] and box[3] > box[1]):
            err.add(f"{where}.box", f"expected x2 > x1 and y2 > y1, got {list(box)}")
            box = None
        else:
            box = tuple(float(v) for v in box)
    landmarks = raw.get("landmarks")
    if landmarks is not None:
        ok = (
            isinstance(landmarks, Sequence)
            and len(landmarks) == 5
            and all(isinstance(p, Sequence) and len(p) == 2 and all(_is_number(v) for v in p) for p in landmarks)
        )
        if not ok:
            err.add(f"{where}.landmarks", f"expected 5 [x, y] points of finite numbers, got {landmarks!r}")
            landmarks = None
        else:
            landmarks = tuple((float(p[0]), float(p[1])) for p in landmarks)
    has_pixels = strings["crop"] is not None or embedding is not None
    if image is not None and box is None and landmarks is None:
        err.add(where, "a face on a scene image needs `box` or `landmarks` to locate it")
    elif not has_pixels and image is None and not any(k in raw for k in ("crop", "embedding", "image")):
        err.add(where, "no face source: give `crop`, `embedding`, or `image` with `box`/`landmarks`")
    return Face(
        identity=strings["identity"],
        name=strings["name"],
        photo=strings["photo"],
        crop=strings["crop"],
        embedding=embedding,
        image=image,
        box=box,
        landmarks=landmarks,
    )


def _parse_turns(raw: object, err: _Errors) -> list[Turn]:
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        err.add("conversations", f"expected a non-empty list of turns, got {raw!r}"[:200])
        return []
    turns: list[Turn] = []
    for j, t in enumerate(raw):
        where = f"conversations[{j}]"
        if not isinstance(t, Mapping):
            err.add(where, f"expected an object with `from` and `value`, got {type(t).__name__}")
            continue
        for key in sorted(set(t) - _KNOWN_TURN_KEYS):
            err.add(f"{where}.{key}", "unknown field; expected `from` and `value`")
        role_raw = t.get("from", t.get("role"))
        text = t.get("value", t.get("content"))
        role = ROLE_ALIASES.get(role_raw) if isinstance(role_raw, str) else None
        if role is None:
            err.add(f"{where}.from", f"unknown role {role_raw!r}; expected one of {sorted(ROLE_ALIASES)}")
            continue
        if not isinstance(text, str):
            err.add(f"{where}.value", f"expected a string, got {type(text).__name__}")
            continue
        turns.append(Turn(role, text))
    return turns


def _check_turn_order(turns: list[Turn], err: _Errors) -> None:
    body = turns[1:] if turns and turns[0].role == "system" else turns
    for j, t in enumerate(turns):
        if t.role == "system" and j > 0:
            err.add(f"conversations[{j}].from", "a system turn may only come first")
    if not body:
        err.add("conversations", "needs at least one user turn and one assistant turn")
        return
    offset = len(turns) - len(body)
    for j, t in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if t.role != expected:
            article = "a" if expected == "user" else "an"
            err.add(
                f"conversations[{j + offset}].from",
                f"expected {article} {expected} turn (turns alternate), got {t.role}",
            )
            return
    if body[-1].role != "assistant":
        err.add("conversations", "the last turn must be the assistant's answer")


def _check_face_refs(turns: list[Turn], num_faces: int, err: _Errors) -> None:
    bare = indexed = 0
    referenced: set[int] = set()
    for j, t in enumerate(turns):
        where = f"conversations[{j}].value"
        refs = list(FACE_REF_RE.finditer(t.text))
        stray = [m.group(0) for m in _FACE_LIKE_RE.finditer(t.text) if not FACE_REF_RE.fullmatch(m.group(0))]
        if stray:
            err.add(where, f"malformed face reference(s) {stray}; write <face> or <face_i> (i = face index)")
        if refs and t.role == "assistant":
            err.add(where, "assistant turns must not contain face placeholders")
        for m in refs:
            if m.group(1) is None:
                referenced.add(bare)
                bare += 1
            else:
                indexed += 1
                k = int(m.group(1))
                if k >= num_faces:
                    err.add(where, f"<face_{k}> refers to a face that does not exist ({num_faces} face(s) listed)")
                referenced.add(k)
    if bare and indexed:
        err.add("conversations", "mixes bare <face> and indexed <face_i> references; use one style per sample")
    elif bare and bare != num_faces:
        err.add("conversations", f"has {bare} bare <face> placeholder(s) but {num_faces} face(s) are listed")
    elif indexed:
        missing = sorted(set(range(num_faces)) - referenced)
        if missing:
            err.add("faces", f"face(s) {missing} are never referenced in the conversation")


def _check_target(task: str, target: object, err: _Errors) -> dict[str, Any]:
    if target is None:
        target = {}
    if not isinstance(target, Mapping):
        err.add("target", f"expected an object, got {type(target).__name__}")
        return {}
    for key, kind in TARGET_FIELDS[task]:
        if key not in target:
            err.add(f"target.{key}", f"required for task {task!r}")
        elif not isinstance(target[key], kind) or isinstance(target[key], bool):
            err.add(f"target.{key}", f"expected {getattr(kind, '__name__', kind)}, got {target[key]!r}")
    if task == "recognition" and target.get("answer") not in (None, "yes", "no"):
        err.add("target.answer", f"expected 'yes' or 'no', got {target.get('answer')!r}")
    names = target.get("names")
    if task in ("naming", "caption") and isinstance(names, list) and not all(isinstance(n, str) and n for n in names):
        err.add("target.names", f"expected a list of non-empty names, got {target['names']!r}")
    return dict(target)


def parse_sample(raw: object, index: int = 0) -> tuple[Sample | None, list[tuple[str, str, str]]]:
    """Parse and validate one sample dict. Returns (sample or None, errors)."""
    if not isinstance(raw, Mapping):
        return None, [(f"#{index}", "<sample>", f"expected an object, got {type(raw).__name__}")]
    sid = raw.get("id")
    err = _Errors(sid if isinstance(sid, str) and sid else f"#{index}")
    if not isinstance(sid, str) or not sid:
        err.add("id", f"expected a non-empty string, got {sid!r}")
    for key in sorted(set(raw) - _KNOWN_SAMPLE_KEYS):
        err.add(key, f"unknown field; expected one of {sorted(_KNOWN_SAMPLE_KEYS)}")
    task = raw.get("task", "other")
    if task not in TARGET_FIELDS:
        err.add("task", f"unknown task {task!r}; expected one of {list(TASKS)}")
        task = "other"
    if "image" in raw and "images" in raw:
        err.add("images", "give `image` (one path) or `images` (a list), not both")
    images_raw = raw.get("images", [raw["image"]] if "image" in raw else [])
    if not isinstance(images_raw, list) or not all(isinstance(p, str) and p for p in images_raw):
        err.add("images", f"expected a list of image paths, got {images_raw!r}"[:200])
        images_raw = []
    faces_raw = raw.get("faces", [])
    if not isinstance(faces_raw, list):
        err.add("faces", f"expected a list, got {type(faces_raw).__name__}")
        faces_raw = []
    faces = [_parse_face(f, i, len(images_raw), err) for i, f in enumerate(faces_raw)]
    image_size = raw.get("image_size")
    if image_size is not None:
        ok = isinstance(image_size, Sequence) and len(image_size) == 2
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size):
            err.add("image_size", f"expected [width, height] of positive ints, got {image_size!r}")
            image_size = None
        else:
            image_size = (int(image_size[0]), int(image_size[1]))
            for i, f in enumerate(faces):
                if f is not None and f.box is not None:
                    x1, y1, x2, y2 = f.box
                    if x1 < 0 or y1 < 0 or x2 > image_size[0] or y2 > image_size[1]:
                        err.add(
                            f"faces[{i}].box",
                            f"box {list(f.box)} falls outside the {image_size[0]} x {image_size[1]} picture",
                        )
    turns = _parse_turns(raw.get("conversations"), err)
    if turns:
        _check_turn_order(turns, err)
        _check_face_refs(turns, len(faces_raw), err)
    target = _check_target(task, raw.get("target"), err)
    meta = raw.get("meta", {})
    if not isinstance(meta, Mapping):
        err.add("meta", f"expected an object, got {type(meta).__name__}")
        meta = {}
    if err.items:
        return None, err.items
    sample = Sample(
        id=sid,
        task=task,
        faces=tuple(f for f in faces if f is not None),
        turns=tuple(turns),
        images=tuple(images_raw),
        target=target,
        meta=dict(meta),
        image_size=image_size,
    )
    return sample, []


def validate_samples(raws: Iterable[object], source: str = "") -> list[Sample]:
    """Parse every sample; raise one `VQAValidationError` listing all problems (ids must be unique)."""
    samples: list[Sample] = []
    errors: list[tuple[str, str, str]] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raws):
        sample, errs = parse_sample(raw, i)
        errors.extend(errs)
        if sample is not None:
            if sample.id in seen:
                errors.append((sample.id, "id", f"duplicate id (also sample #{seen[sample.id]})"))
            seen[sample.id] = i
            samples.append(sample)
    if errors:
        raise VQAValidationError(errors, source)
    return samples


def load_samples(path: str | Path) -> list[Sample]:
    """Read a JSON list (LLaVA style) or a JSON Lines file of samples and validate them."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        raws = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    raws.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise VQAValidationError([(f"line {n}", "<json>", str(exc))], str(path)) from None
    else:
        try:
            raws = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VQAValidationError([("<file>", "<json>", str(exc))], str(path)) from None
        if not isinstance(raws, list):
            raise VQAValidationError([("<file>", "<json>", "expected a JSON list of samples")], str(path))
    return validate_samples(raws, str(path))


def check_files(samples: Iterable[Sample], root: str | Path, num_embeddings: int | None = None) -> None:
    """Check that every referenced crop/image exists under `root` and embedding rows are in range."""
    root = Path(root)
    errors: list[tuple[str, str, str]] = []
    for s in samples:
        for j, img in enumerate(s.images):
            if not (root / img).is_file():
                errors.append((s.id, f"images[{j}]", f"file not found: {root / img}"))
        for i, f in enumerate(s.faces):
            if f.crop is not None and not (root / f.crop).is_file():
                errors.append((s.id, f"faces[{i}].crop", f"file not found: {root / f.crop}"))
            if isinstance(f.image, str) and not (root / f.image).is_file():
                errors.append((s.id, f"faces[{i}].image", f"file not found: {root / f.image}"))
            if f.embedding is not None and num_embeddings is not None and f.embedding >= num_embeddings:
                errors.append(
                    (s.id, f"faces[{i}].embedding", f"row {f.embedding} out of range ({num_embeddings} rows stored)")
                )
    if errors:
        raise VQAValidationError(errors, str(root))


def dump_samples(samples: Iterable[Sample]) -> str:
    """Samples as a LLaVA-style JSON list (one sample per line inside the list, diff-friendly)."""
    lines = [json.dumps(s.to_dict(), ensure_ascii=False) for s in samples]
    return "[\n" + ",\n".join(lines) + "\n]\n"
