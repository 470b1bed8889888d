"""Build identity-grounded VQA training and evaluation sets from identity-labelled face photos.

Input: a list of `FacePhoto` (identity label + unique photo id + an aligned crop and/or a
precomputed embedding), from any source (`sources.py`: folder per identity, RecordIO, synthetic,
an embedding table). Output: a directory with `train.json`, `eval.json` (LLaVA-style samples,
`schema.py`), `manifest.json`, and where the source had them `embeddings.safetensors`, `crops/`
and `scenes/`.

Splits (so nothing evaluated is ever trained on):
    identities -> enrolled (named; the model learns them)
                  train-unknown (never named; teach the model to abstain)
                  eval-unknown (never in training at all: split by identity)
    photos of each enrolled identity -> train photos | eval photos (split by image)
Train samples draw only from enrolled train photos and train-unknown people, eval samples only
from enrolled eval photos and eval-unknown people. `check_splits` verifies this after every build.

Tasks (each a question about a "photo" of 1..max_faces people arranged left to right):
recognition ("Is Alice in this photo?"), naming ("Who is on the left?"), caption, counting,
unknown (asked about someone not enrolled -> abstain), text_qa (facts about an enrolled person,
asked without any face). RAP-style negatives add names of people who are *not* in the photo to the
prompt with the answer unchanged, which is what teaches a model not to repeat names it is shown.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic_file import atomic_path
from .schema import TASKS, Face, Sample, Turn, dump_samples

FORMAT_VERSION = 1
ABSTAIN_ANSWER = "I don't know this person."
UNKNOWN_PERSON = "an unknown person"
CROP_SIZE = 112
_GAP = 16  # pixels between faces on a virtual scene canvas


@dataclass(frozen=True)
class FacePhoto:
    """One photo of one identity. `photo` must be unique within a source."""

    identity: str
    photo: str
    crop: str | None = None  # path of an aligned 112x112 crop (absolute, or relative to the output dir)
    embedding: np.ndarray | None = None  # (D,) precomputed identity embedding


@dataclass(frozen=True)
class VQABuildConfig:
    """How to split identities and photos and how many samples of each task to write.

    Args:
        seed: all random choices derive from it; the same inputs and seed give the same files.
        num_enrolled: identities the model learns by name (None: all eligible ones left after the
            unknown quotas). Only identities with >= 2 photos can be enrolled.
        num_train_unknown / num_eval_unknown: identities used only as unknown people in training /
            only in evaluation.
        eval_photos_per_identity: photos of each enrolled identity held out for evaluation (at
            least one photo always stays in training).
        tasks: which tasks to generate.
        train_per_task / eval_per_task: samples per task and split.
        max_faces: most people in one photo (>= 1).
        unknown_prob: chance that a scene for caption/counting includes an unknown person.
        negative_context_prob: chance that a naming/caption/unknown/recognition prompt lists names
            of people who are not in the photo (RAP-style negatives; the answer is unchanged).
        num_distractor_names: invented names that belong to nobody, used in negatives and to
            catch hallucination.
        names: identity label -> display name (default: generated, deterministic names).
        attributes: identity label -> {attribute: value} for text-only QA (default: none, so no
            text_qa samples unless given).
    """

    seed: int = 0
    num_enrolled: int | None = None
    num_train_unknown: int = 2
    num_eval_unknown: int = 2
    eval_photos_per_identity: int = 1
    tasks: tuple[str, ...] = ("recognition", "naming", "caption", "counting", "unknown", "text_qa")
    train_per_task: int = 200
    eval_per_task: int = 50
    max_faces: int = 3
    unknown_prob: float = 0.3
    negative_context_prob: float = 0.3
    num_distractor_names: int = 8
    names: Mapping[str, str] = field(default_factory=dict)
    attributes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("num_train_unknown", "num_eval_unknown", "train_per_task", "eval_per_task", "num_distractor_names"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"VQABuildConfig.{key} must be an int >= 0, got {value!r}")
        if self.num_enrolled is not None and (not isinstance(self.num_enrolled, int) or self.num_enrolled < 1):
            raise ValueError(f"VQABuildConfig.num_enrolled must be None or an int >= 1, got {self.num_enrolled!r}")
        if not isinstance(self.eval_photos_per_identity, int) or self.eval_photos_per_identity < 1:
            raise ValueError(
                f"VQABuildConfig.eval_photos_per_identity must be an int >= 1, got {self.eval_photos_per_identity!r}"
            )
        if not isinstance(self.max_faces, int) or self.max_faces < 1:
            raise ValueError(f"VQABuildConfig.max_faces must be an int >= 1, got {self.max_faces!r}")
        for key in ("unknown_prob", "negative_context_prob"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"VQABuildConfig.{key} must be in [0, 1], got {value!r}")
        choices = [t for t in TASKS if t not in ("other", "region")]  # region questions: scenes.py
        bad = [t for t in self.tasks if t not in choices]
        if bad or not self.tasks:
            raise ValueError(f"VQABuildConfig.tasks: unknown task(s) {bad}; choose from {choices}")
        for ident, name in self.names.items():
            if not isinstance(name, str) or not name.strip() or "<" in name:
                raise ValueError(
                    f"VQABuildConfig.names[{ident!r}]: expected a non-empty name without '<', got {name!r}"
                )


@dataclass(frozen=True)
class Split:
    """Who and what is used where. Photo ids are those of the source."""

    enrolled: dict[str, str]  # identity -> name
    train_unknown: list[str]
    eval_unknown: list[str]
    train_photos: dict[str, list[FacePhoto]]  # identity -> photos (enrolled + train-unknown)
    eval_photos: dict[str, list[FacePhoto]]  # identity -> photos (enrolled + eval-unknown)
    distractor_names: list[str]


# -- names ---------------------------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "j")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "l", "r", "s")


def generate_names(count: int, seed: int, taken: Sequence[str] = ()) -> list[str]:
    """`count` distinct invented names ("Koren", "Sheli", ...) not in `taken`, deterministic in `seed`.

    Invented names keep tests free of real people and make hallucination easy to detect (no name
    is a common word).
    """
    rng = random.Random(f"names-{seed}")
    used = {n.lower() for n in taken}
    names: list[str] = []
    attempts = 0
    while len(names) < count:
        attempts += 1
        if attempts > 100 * (count + 10):
            raise ValueError(f"could not invent {count} distinct names")
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        name = word.capitalize()
        if name.lower() not in used:
            used.add(name.lower())
            names.append(name)
    return names


# -- splitting -----------------------------------------------------------------------------------


def split_photos(photos: Sequence[FacePhoto], config: VQABuildConfig) -> Split:
    """Partition identities and photos as described in the module docstring."""
    by_id: dict[str, list[FacePhoto]] = {}
    seen: dict[str, str] = {}
    for p in photos:
        if p.photo in seen:
            raise ValueError(f"photo id {p.photo!r} appears twice (identities {seen[p.photo]!r} and {p.identity!r})")
        seen[p.photo] = p.identity
        by_id.setdefault(p.identity, []).append(p)
    rng = random.Random(config.seed)
    identities = sorted(by_id)
    rng.shuffle(identities)
    need_two = config.eval_photos_per_identity + 1
    eligible = [i for i in identities if len(by_id[i]) >= need_two]
    # Unknown people are taken first from identities too small to enrol, then from the rest.
    small = [i for i in identities if len(by_id[i]) < need_two]
    pool_unknown = small + [i for i in eligible if i not in small]
    n_unknown = config.num_train_unknown + config.num_eval_unknown
    if config.num_enrolled is not None:
        enrolled_ids = eligible[: config.num_enrolled]
        if len(enrolled_ids) < config.num_enrolled:
            raise ValueError(
                f"num_enrolled={config.num_enrolled} but only {len(eligible)} identities have "
                f">= {need_two} photos (eval_photos_per_identity={config.eval_photos_per_identity})"
            )
        unknown_ids = [i for i in pool_unknown if i not in set(enrolled_ids)][:n_unknown]
    else:
        unknown_ids = pool_unknown[:n_unknown]
        enrolled_ids = [i for i in eligible if i not in set(unknown_ids)]
    if len(unknown_ids) < n_unknown:
        raise ValueError(
            f"need {n_unknown} unknown identities (train {config.num_train_unknown} + eval "
            f"{config.num_eval_unknown}) besides {len(enrolled_ids)} enrolled, but the source has "
            f"{len(identities)} identities"
        )
    if not enrolled_ids:
        raise ValueError(f"no identity can be enrolled: each needs >= {need_two} photos")
    train_unknown = unknown_ids[: config.num_train_unknown]
    eval_unknown = unknown_ids[config.num_train_unknown :]

    given = dict(config.names)
    missing = [i for i in enrolled_ids if i not in given]
    invented = iter(generate_names(len(missing), config.seed, taken=list(given.values())))
    enrolled = {i: given[i] if i in given else next(invented) for i in sorted(enrolled_ids)}
    dupes = {n for n in enrolled.values() if list(enrolled.values()).count(n) > 1}
    if dupes:
        raise ValueError(f"two enrolled identities share the name(s) {sorted(dupes)}; names must be unique")
    distractors = generate_names(config.num_distractor_names, config.seed + 1, taken=list(enrolled.values()))

    train_photos: dict[str, list[FacePhoto]] = {}
    eval_photos: dict[str, list[FacePhoto]] = {}
    for ident in sorted(enrolled):
        ps = sorted(by_id[ident], key=lambda p: p.photo)
        rng.shuffle(ps)
        k = config.eval_photos_per_identity
        eval_photos[ident], train_photos[ident] = ps[:k], ps[k:]
    for ident in train_unknown:
        train_photos[ident] = sorted(by_id[ident], key=lambda p: p.photo)
    for ident in eval_unknown:
        eval_photos[ident] = sorted(by_id[ident], key=lambda p: p.photo)
    return Split(enrolled, sorted(train_unknown), sorted(eval_unknown), train_photos, eval_photos, distractors)


def check_splits(train: Sequence[Sample], evaluation: Sequence[Sample], eval_only_identities: Sequence[str]) -> None:
    """Raise if an evaluation photo or an evaluation-only identity appears in training samples."""
    train_photos = {f.photo for s in train for f in s.faces if f.photo is not None}
    train_ids = {f.identity for s in train for f in s.faces if f.identity is not None}
    leaked_photos = sorted({f.photo for s in evaluation for f in s.faces if f.photo in train_photos})
    if leaked_photos:
        raise AssertionError(f"{len(leaked_photos)} evaluation photo(s) are also in training, e.g. {leaked_photos[:5]}")
    leaked_ids = sorted(train_ids & set(eval_only_identities))
    if leaked_ids:
        raise AssertionError(f"evaluation-only identities appear in training: {leaked_ids[:5]}")


# -- sample generation ---------------------------------------------------------------------------


def position_words(n: int) -> list[str]:
    """Where each of n people (sorted left to right) stands, as words."""
    if n == 1:
        return ["in the photo"]
    if n == 2:
        return ["on the left", "on the right"]
    if n == 3:
        return ["on the left", "in the middle", "on the right"]
    ordinals = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
    return [f"{ordinals[i]} from the left" if i < len(ordinals) else f"number {i + 1} from the left" for i in range(n)]


def _join(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


class _SceneMaker:
    """Draws photos of distinct people from one split and turns them into samples."""

    def __init__(self, split: Split, which: str, config: VQABuildConfig, rng: random.Random) -> None:
        self.split, self.config, self.rng = split, config, rng
        self.photos = split.train_photos if which == "train" else split.eval_photos
        unknown = split.train_unknown if which == "train" else split.eval_unknown
        self.known = [i for i in sorted(split.enrolled) if self.photos.get(i)]
        self.unknown = [i for i in unknown if self.photos.get(i)]

    def people(self, n_known: int, n_unknown: int) -> list[FacePhoto]:
        ids = self.rng.sample(self.known, n_known) + self.rng.sample(self.unknown, n_unknown)
        self.rng.shuffle(ids)  # left-to-right order is random
        return [self.rng.choice(self.photos[i]) for i in ids]

    def scene_size(self, with_unknown: bool) -> tuple[int, int]:
        n = self.rng.randint(1, self.config.max_faces)
        n_unknown = 1 if with_unknown and self.unknown else 0
        n_known = max(0, min(n - n_unknown, len(self.known)))
        if n_known + n_unknown == 0:
            n_known = 1
        return n_known, n_unknown

    def faces(self, people: Sequence[FacePhoto], rows: Mapping[str, int]) -> tuple[Face, ...]:
        faces = []
        for k, p in enumerate(people):
            x0 = _GAP + k * (CROP_SIZE + _GAP)
            faces.append(
                Face(
                    identity=p.identity,
                    name=self.split.enrolled.get(p.identity),
                    photo=p.photo,
                    crop=p.crop,
                    embedding=rows.get(p.photo),
                    box=(float(x0), float(_GAP), float(x0 + CROP_SIZE), float(_GAP + CROP_SIZE)),
                )
            )
        return tuple(faces)

    def distractors(self, exclude: set[str], k: int = 2) -> list[str]:
        """Names of people not in the photo: other enrolled people and invented names."""
        pool = [n for n in list(self.split.enrolled.values()) + self.split.distractor_names if n not in exclude]
        return self.rng.sample(pool, min(k, len(pool)))

    def prompt(self, n_faces: int, question: str, exclude: set[str], allow_context: bool = True) -> tuple[str, list]:
        """The user turn: the question alone. Who is where is written by the one prompt format
        (`lvface_mm.vqa.rendering`) from the faces' boxes, exactly as `IdentityVLM.ask` writes it.
        RAP-style distractor names are drawn (kept in `meta`) for the candidate list of open-set mode."""
        context: list[str] = []
        if allow_context and self.rng.random() < self.config.negative_context_prob:
            context = self.distractors(exclude)
        return question, context

    @property
    def canvas(self) -> tuple[int, int]:
        """One picture size for every sample: room for `max_faces` crops side by side."""
        return (_GAP + self.config.max_faces * (CROP_SIZE + _GAP), CROP_SIZE + 2 * _GAP)


def _describe(faces: Sequence[Face]) -> str:
    where = position_words(len(faces))
    who = [f.name or UNKNOWN_PERSON for f in faces]
    parts = [f"{n} {w}" for n, w in zip(who, where)] if len(faces) > 1 else who
    return "In this photo: " + _join(parts) + "."


def _make_sample(maker: _SceneMaker, task: str, sid: str, rows: Mapping[str, int]) -> Sample | None:
    rng, enrolled = maker.rng, maker.split.enrolled
    meta: dict[str, Any] = {}
    if task == "text_qa":
        candidates = [i for i in maker.known if maker.config.attributes.get(i)]
        if not candidates:
            return None
        ident = rng.choice(candidates)
        key, value = rng.choice(sorted(maker.config.attributes[ident].items()))
        name = enrolled[ident]
        turns = (Turn("user", f"What is {name}'s {key}?"), Turn("assistant", f"{name}'s {key} is {value}."))
        return Sample(sid, task, (), turns, target={"answer": value}, meta={"identity": ident})

    if task == "unknown":
        if not maker.unknown:
            return None
        n_known, _ = maker.scene_size(with_unknown=False)
        n_known = min(n_known, maker.config.max_faces - 1)
        people = maker.people(n_known, 1)
    elif task in ("caption", "counting"):
        people = maker.people(*maker.scene_size(with_unknown=rng.random() < maker.config.unknown_prob))
    else:  # recognition, naming: every face known, so the question is about enrolled people only
        n_known, _ = maker.scene_size(with_unknown=False)
        people = maker.people(max(1, n_known), 0)
    faces = maker.faces(people, rows)
    names = [f.name for f in faces if f.name]
    where = position_words(len(faces))

    if task == "recognition":
        positive = rng.random() < 0.5
        if positive:
            k = rng.randrange(len(faces))
            query = faces[k].name
            answer = f"Yes, {query} is {where[k]}."
        else:
            query = rng.choice([n for n in list(enrolled.values()) if n not in names])
            answer = f"No, {query} is not in this photo."
        text, context = maker.prompt(len(faces), f"Is {query} in this photo?", set(names) | {query})
        target: dict[str, Any] = {"query": query, "answer": "yes" if positive else "no"}
    elif task == "naming":
        k = rng.randrange(len(faces))
        question = "Who is this?" if len(faces) == 1 else f"Who is {where[k]}?"
        text, context = maker.prompt(len(faces), question, set(names))
        answer = f"This is {faces[k].name}." if len(faces) == 1 else f"{faces[k].name}."
        target = {"names": [faces[k].name]}
        meta["face"] = k
    elif task == "unknown":
        k = next(i for i, f in enumerate(faces) if f.name is None)
        question = "Who is this?" if len(faces) == 1 else f"Who is {where[k]}?"
        text, context = maker.prompt(len(faces), question, set(names))
        answer, target = ABSTAIN_ANSWER, {}
        meta["face"] = k
    elif task == "caption":
        text, context = maker.prompt(len(faces), "Who is in this photo?", set(names))
        answer = _describe(faces)
        target = {"names": names, "num_unknown": sum(f.name is None for f in faces)}
    else:  # counting
        text, context = maker.prompt(len(faces), "How many people are in this photo?", set(), allow_context=False)
        n = len(faces)
        answer = "There is 1 person." if n == 1 else f"There are {n} people."
        target = {"count": n}
    if context:
        meta["distractors"] = context
    turns = (Turn("user", text), Turn("assistant", answer))
    return Sample(sid, task, faces, turns, target=target, meta=meta, image_size=maker.canvas)


def generate_samples(split: Split, which: str, config: VQABuildConfig, rows: Mapping[str, int]) -> list[Sample]:
    """All samples of one split ("train" or "eval"), task by task, deterministic in the seed."""
    count = config.train_per_task if which == "train" else config.eval_per_task
    rng = random.Random(f"{config.seed}-{which}")
    maker = _SceneMaker(split, which, config, rng)
    samples: list[Sample] = []
    for task in config.tasks:
        for k in range(count):
            s = _make_sample(maker, task, f"{which}-{task}-{k:05d}", rows)
            if s is None:
                break  # the task cannot be built from this source (e.g. no attributes given)
            samples.append(s)
    return samples


# -- writing -------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def build_vqa(
    photos: Sequence[FacePhoto],
    out_dir: str | Path,
    config: VQABuildConfig = VQABuildConfig(),
    *,
    scenes: Sequence[str | Path] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Split `photos`, generate samples, and write the dataset directory.

    Crop paths are written relative to `out_dir` when they lie inside it. If the photos carry
    embeddings they are stored as one table (`embeddings.safetensors`, key "embeddings", (N, D)
    float32) and faces refer to rows of it. With `scenes` (background photos), every sample whose
    faces all have crops also gets a composed scene image under `scenes/`, and its faces get
    `image`, `box` and `landmarks` on it, so the detection-and-alignment path can be evaluated too.

    Raises:
        FileExistsError: `out_dir` already holds a dataset and `overwrite` is False.
        ValueError: the source cannot satisfy the config (too few identities or photos).

    Returns:
        The manifest (also written to `manifest.json`).
    """
    out = Path(out_dir)
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a VQA dataset; pass overwrite=True (--overwrite) to replace it")
    split = split_photos(photos, config)  # fails early on a source that cannot satisfy the config
    out.mkdir(parents=True, exist_ok=True)

    unique = {p.photo: p for ps in (split.train_photos, split.eval_photos) for v in ps.values() for p in v}
    used = sorted(unique.values(), key=lambda p: p.photo)
    with_emb = [p for p in used if p.embedding is not None]
    if with_emb and len(with_emb) != len(used):
        raise ValueError(f"{len(used) - len(with_emb)} photo(s) have no embedding while others do; give all or none")
    rows = {p.photo: i for i, p in enumerate(with_emb)}
    resolved = [_relative_crop(p, out) for p in used]
    by_photo = {p.photo: p for p in resolved}
    split = Split(
        split.enrolled,
        split.train_unknown,
        split.eval_unknown,
        {i: [by_photo[p.photo] for p in ps] for i, ps in split.train_photos.items()},
        {i: [by_photo[p.photo] for p in ps] for i, ps in split.eval_photos.items()},
        split.distractor_names,
    )
    train = generate_samples(split, "train", config, rows)
    evaluation = generate_samples(split, "eval", config, rows)
    check_splits(train, evaluation, split.eval_unknown)
    if scenes:
        train = compose_scenes(train, out, scenes, seed=config.seed)
        evaluation = compose_scenes(evaluation, out, scenes, seed=config.seed + 1)

    if with_emb:
        from safetensors.numpy import save

        table = np.stack([np.asarray(p.embedding, dtype=np.float32) for p in with_emb])  # (N, D)
        _write_atomic(out / "embeddings.safetensors", save({"embeddings": table}))
    _write_atomic(out / "train.json", dump_samples(train).encode("utf-8"))
    _write_atomic(out / "eval.json", dump_samples(evaluation).encode("utf-8"))
    manifest = _manifest(config, split, train, evaluation, table.shape if with_emb else None)
    # The manifest goes last: its presence marks a complete dataset.
    _write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


def compose_scenes(samples: Sequence[Sample], out: Path, backgrounds: Sequence[str | Path], seed: int) -> list[Sample]:
    """Paste each sample's crops side by side onto a background photo and point the faces at it."""
    from PIL import Image

    from ..models.pretrained import ARCFACE_TEMPLATE_112

    rng = random.Random(f"scenes-{seed}")
    (out / "scenes").mkdir(exist_ok=True)
    result: list[Sample] = []
    for s in samples:
        if not s.faces or any(f.crop is None or f.box is None for f in s.faces):
            result.append(s)
            continue
        # The sample's canvas size, so every scene of a dataset has one size (batched pixel inputs).
        width, height = s.image_size or (int(max(f.box[2] for f in s.faces)) + _GAP, CROP_SIZE + 2 * _GAP)  # type: ignore[index]
        with Image.open(rng.choice(list(backgrounds))) as bg:
            canvas = _cover(bg.convert("RGB"), width, height)
        faces = []
        for f in s.faces:
            crop_path = Path(f.crop) if Path(f.crop).is_absolute() else out / f.crop  # type: ignore[arg-type]
            with Image.open(crop_path) as im:
                canvas.paste(im.convert("RGB").resize((CROP_SIZE, CROP_SIZE)), (int(f.box[0]), int(f.box[1])))
            x0, y0 = f.box[0], f.box[1]  # type: ignore[index]
            marks = tuple((x0 + x, y0 + y) for x, y in ARCFACE_TEMPLATE_112)
            faces.append(replace(f, image=0, landmarks=marks))
        rel = f"scenes/{s.id}.jpg"
        canvas.save(out / rel, quality=92)
        result.append(replace(s, images=(rel,), faces=tuple(faces)))
    return result


def _cover(im, width: int, height: int):
    """Resize and centre-crop a PIL image so it covers width x height."""
    scale = max(width / im.width, height / im.height)
    im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))))
    left, top = (im.width - width) // 2, (im.height - height) // 2
    return im.crop((left, top, left + width, top + height))


def _manifest(
    config: VQABuildConfig, split: Split, train: list[Sample], evaluation: list[Sample], table: tuple | None
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "config": _jsonable(asdict(config)),
        "enrolled": split.enrolled,
        "train_unknown": split.train_unknown,
        "eval_unknown": split.eval_unknown,
        "distractor_names": split.distractor_names,
        "vocabulary": sorted(set(split.enrolled.values()) | set(split.distractor_names)),
        "num_train_photos": sum(len(v) for v in split.train_photos.values()),
        "num_eval_photos": sum(len(v) for v in split.eval_photos.values()),
        "num_samples": {"train": len(train), "eval": len(evaluation)},
        "tasks": {
            which: {t: sum(s.task == t for s in ss) for t in config.tasks}
            for which, ss in (("train", train), ("eval", evaluation))
        },
        "embeddings": None if table is None else {"file": "embeddings.safetensors", "rows": table[0], "dim": table[1]},
    }


def _relative_crop(p: FacePhoto, out: Path) -> FacePhoto:
    if p.crop is None:
        return p
    path = Path(p.crop)
    if path.is_absolute():
        try:
            return FacePhoto(p.identity, p.photo, path.resolve().relative_to(out.resolve()).as_posix(), p.embedding)
        except ValueError:
            return FacePhoto(p.identity, p.photo, str(path), p.embedding)
    return p


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def load_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a VQA dataset (no manifest.json); build one with `lvface-mm build-vqa`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest
