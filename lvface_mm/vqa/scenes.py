"""Procedural scenes: questions that need the identity and the picture together.

Each scene places 1..max_people synthetic people (the faces of `lvface_mm.data.synthetic`) side by
side; each person holds a distinct object in a distinct colour, drawn beside their body. Questions
can only be answered by linking an identity to its region of the picture:

    region   "What is Koren holding?" -> "A red cup."          (name -> face -> region -> object)
             "Who holds the red cup?" -> "Koren."               (object -> region -> face -> name)
             "Is Koren left of Sheli?" -> "Yes." / "No."        (two names -> two regions)
    naming   "Who is on the left?" -> "Koren."
    unknown  asked about a face none of the references matches -> "This is an unknown person."
    counting "How many people are in the picture?" -> "There are 2 people."

Names follow the open-set binding recipe of `binding.py`: each sample's context lists the
gallery's top candidates (retrieved by embedding similarity, wrong ones included, the true one
sometimes left out) with their enrolled reference photo, and names are drawn per sample from a
pool split between training and evaluation. Two evaluation splits: `eval_seen.json` (people seen in
training, other photos, unseen names) and `eval.json` (people never seen in training, unseen names).

Faces carry an identity embedding (an embedding table, as a trained LVFace gives one per photo) so
the gallery search and `face_input: embedding` training need no encoder; pixels are the synthetic
faces, so a VLM also sees them.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .builder import FORMAT_VERSION, UNKNOWN_PERSON, _write_atomic, generate_names, position_words
from .schema import Face, Sample, Turn, dump_samples

SCENE_TASKS = ("region", "naming", "unknown", "counting")
OBJECTS = ("cup", "ball", "book", "flag", "box", "umbrella")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 90, 230),
    "green": (40, 170, 70),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
FACE = 40  # face side in the scene, pixels
CELL = 96  # width per person
HEIGHT = 128


@dataclass(frozen=True)
class ScenesConfig:
    """Scene data set size, splits and sampling.

    Args:
        seed: every random choice (and the synthetic faces) derive from it.
        num_identities: synthetic identities in all.
        photos_per_identity: photos per identity (one is the enrolled reference).
        num_unseen: identities kept out of training (the unseen-identity evaluation split).
        max_people: most people in a scene.
        name_pool_size / eval_name_fraction: the name pool and its evaluation share.
        num_candidates: references shown per sample.
        omit_true_prob: chance the asked person is left out of the candidates.
        train_per_task / eval_per_task: samples per task and split.
        tasks: subset of `SCENE_TASKS`.
        embedding_dim / embedding_noise: the identity embeddings (cluster centre + noise per photo).
    """

    seed: int = 0
    num_identities: int = 24
    photos_per_identity: int = 4
    num_unseen: int = 6
    max_people: int = 2
    name_pool_size: int = 600
    eval_name_fraction: float = 0.25
    num_candidates: int = 3
    omit_true_prob: float = 0.15
    train_per_task: int = 200
    eval_per_task: int = 40
    tasks: tuple[str, ...] = SCENE_TASKS
    embedding_dim: int = 512
    embedding_noise: float = 0.35

    def __post_init__(self) -> None:
        if self.max_people < 1 or self.max_people > len(OBJECTS):
            raise ValueError(f"ScenesConfig.max_people must be in 1..{len(OBJECTS)}, got {self.max_people}")
        if self.photos_per_identity < 3:
            raise ValueError(
                "ScenesConfig.photos_per_identity must be >= 3 (reference, training and evaluation photos)"
            )
        if self.num_unseen < max(self.num_candidates, self.max_people) + 1:
            raise ValueError(
                f"ScenesConfig.num_unseen={self.num_unseen} cannot fill {self.num_candidates} candidates; "
                f"need >= {max(self.num_candidates, self.max_people) + 1}"
            )
        if self.num_identities - self.num_unseen < max(self.num_candidates, self.max_people) + 1:
            raise ValueError("ScenesConfig: too few seen identities for the candidates")
        bad = [t for t in self.tasks if t not in SCENE_TASKS]
        if bad or not self.tasks:
            raise ValueError(f"ScenesConfig.tasks: unknown task(s) {bad}; choose from {list(SCENE_TASKS)}")
        n_eval = int(round(self.name_pool_size * self.eval_name_fraction))
        for side, n in (("training", self.name_pool_size - n_eval), ("evaluation", n_eval)):
            if n < 4 * max(self.num_candidates, self.max_people):
                raise ValueError(
                    f"ScenesConfig.name_pool_size={self.name_pool_size} leaves {n} {side} names; "
                    f"need >= {4 * max(self.num_candidates, self.max_people)}"
                )


# -- drawing -----------------------------------------------------------------------------------
def draw_object(draw: Any, kind: str, colour: tuple[int, int, int], x: int, y: int) -> None:
    """A small object of `kind` with its top-left corner at (x, y), about 24 x 28 pixels."""
    if kind == "cup":
        draw.rectangle((x, y + 6, x + 16, y + 26), fill=colour)
        draw.arc((x + 12, y + 10, x + 24, y + 22), -90, 90, fill=colour, width=3)
    elif kind == "ball":
        draw.ellipse((x, y + 4, x + 22, y + 26), fill=colour)
    elif kind == "book":
        draw.rectangle((x, y + 2, x + 20, y + 28), fill=colour)
        draw.line((x + 3, y + 2, x + 3, y + 28), fill=(250, 250, 250), width=2)
    elif kind == "flag":
        draw.line((x + 2, y, x + 2, y + 28), fill=(60, 40, 20), width=2)
        draw.polygon([(x + 3, y), (x + 22, y + 7), (x + 3, y + 14)], fill=colour)
    elif kind == "box":
        draw.rectangle((x, y + 6, x + 22, y + 28), fill=colour, outline=(30, 30, 30))
    elif kind == "umbrella":
        draw.pieslice((x - 2, y, x + 24, y + 24), 180, 360, fill=colour)
        draw.line((x + 11, y + 12, x + 11, y + 28), fill=(60, 40, 20), width=2)
    else:
        raise ValueError(f"unknown object {kind!r}; known: {list(OBJECTS)}")


def render_scene(
    crops: Sequence[np.ndarray], holdings: Sequence[tuple[str, str]], width: int, seed: int
) -> tuple[np.ndarray, list[tuple[float, float, float, float]], list[tuple[float, float, float, float]]]:
    """Draw people left to right: face, body, and the held object beside the body.

    Returns:
        (H, W, 3) uint8 image, face boxes and object boxes (x1, y1, x2, y2).
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    background = tuple(int(v) for v in rng.integers(150, 230, 3))
    canvas = Image.new("RGB", (width, HEIGHT), background)
    draw = ImageDraw.Draw(canvas)
    faces, objects = [], []
    for j, (crop, (colour, kind)) in enumerate(zip(crops, holdings)):
        x0 = 8 + j * CELL + int(rng.integers(0, 8))
        y0 = 8 + int(rng.integers(0, 6))
        canvas.paste(Image.fromarray(crop).resize((FACE, FACE)), (x0, y0))
        shirt = tuple(int(v) for v in rng.integers(60, 140, 3))
        draw.rectangle((x0 + 4, y0 + FACE + 2, x0 + FACE - 4, HEIGHT - 8), fill=shirt)
        ox, oy = x0 + FACE + 2, y0 + FACE + 10
        draw_object(draw, kind, COLOURS[colour], ox, oy)
        faces.append((float(x0), float(y0), float(x0 + FACE), float(y0 + FACE)))
        objects.append((float(ox - 2), float(oy), float(ox + 24), float(oy + 28)))
    return np.array(canvas), faces, objects


# -- samples -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Person:
    identity: str
    reference: dict[str, Any]  # photo, crop, embedding row
    photos: list[dict[str, Any]]  # scene photos


class _SceneWriter:
    def __init__(
        self,
        out: Path,
        people: dict[str, _Person],
        names: list[str],
        table: np.ndarray,
        config: ScenesConfig,
        which: str,
    ) -> None:
        self.out, self.people, self.names, self.table, self.config, self.which = (
            out,
            people,
            names,
            table,
            config,
            which,
        )
        self.rng = random.Random(f"scenes-{config.seed}-{which}")
        self.ids = sorted(people)
        refs = table[[people[i].reference["embedding"] for i in self.ids]]
        self.refs = refs / np.linalg.norm(refs, axis=1, keepdims=True)  # (N, D) the gallery

    def candidates(self, row: int, k: int) -> list[str]:
        e = self.table[row] / np.linalg.norm(self.table[row])
        order = np.argsort(-(self.refs @ e), kind="stable")[:k]
        return [self.ids[int(j)] for j in order]

    def sample(self, task: str, sid: str) -> Sample:
        from PIL import Image

        rng, cfg = self.rng, self.config
        n = rng.randint(2 if task == "region" else 1, cfg.max_people)
        who = rng.sample(self.ids, n)
        photos = [rng.choice(self.people[i].photos) for i in who]
        k = rng.randrange(n)
        cands: list[str] = []
        for p in photos:  # the gallery's top candidates of every face, best first
            for c in self.candidates(p["embedding"], cfg.num_candidates):
                if c not in cands:
                    cands.append(c)
        drop = task == "unknown" or (task == "naming" and rng.random() < cfg.omit_true_prob)
        if drop:
            cands = [c for c in cands if c != who[k]]
        keep_asked = [c for c in cands if c in who and (c != who[k] or not drop)]
        others = [c for c in cands if c not in keep_asked]
        cands = (keep_asked + others)[: max(cfg.num_candidates, len(keep_asked))]
        rng.shuffle(cands)
        names = dict(zip(cands, rng.sample(self.names, len(cands))))
        holdings = list(zip(rng.sample(sorted(COLOURS), n), rng.sample(OBJECTS, n)))
        crops = []
        for p in photos:
            with Image.open(self.out / p["crop"]) as im:
                crops.append(np.asarray(im.convert("RGB")))
        width = 8 + cfg.max_people * CELL
        image, face_boxes, _ = render_scene(crops, holdings, width, seed=zlib.crc32(f"{cfg.seed}-{sid}".encode()))
        rel = f"scenes/{sid}.png"
        Image.fromarray(image).save(self.out / rel)
        faces = tuple(
            Face(
                identity=i,
                name=names.get(i),
                photo=p["photo"],
                crop=p["crop"],
                embedding=p["embedding"],
                image=0,
                box=b,
            )
            for i, p, b in zip(who, photos, face_boxes)
        )
        refs = [
            {
                "name": names[c],
                "identity": c,
                **{key: self.people[c].reference[key] for key in ("photo", "crop", "embedding")},
            }
            for c in cands
        ]
        question, answer, target, task_name = self._qa(task, faces, holdings, k)
        return Sample(
            sid,
            task_name,
            faces,
            (Turn("user", question), Turn("assistant", answer)),
            images=(rel,),
            target=target,
            meta={"face": k, "references": refs, "holding": [" ".join(h) for h in holdings], "kind": task},
            image_size=(width, HEIGHT),
        )

    def _qa(
        self, task: str, faces: Sequence[Face], holdings: Sequence[tuple[str, str]], k: int
    ) -> tuple[str, str, dict[str, Any], str]:
        rng, n = self.rng, len(faces)
        where = position_words(n)[k]
        if task == "counting":
            answer = "There is 1 person." if n == 1 else f"There are {n} people."
            return "How many people are in the picture?", answer, {"count": n}, "counting"
        if task in ("naming", "unknown"):
            question = "Who is this?" if n == 1 else f"Who is {where}?"
            name = faces[k].name
            if name is None:
                return question, f"This is {UNKNOWN_PERSON}.", {}, "unknown"
            return question, f"{name}.", {"names": [name]}, "naming"
        named = [j for j, f in enumerate(faces) if f.name]
        if not named:  # nobody retrieved: ask about an object instead
            colour, kind = holdings[k]
            return f"Who holds the {colour} {kind}?", f"This is {UNKNOWN_PERSON}.", {}, "unknown"
        style = rng.choice(("holding", "holder", "left_of") if len(named) >= 2 else ("holding", "holder"))
        j = rng.choice(named)
        colour, kind = holdings[j]
        if style == "holding":
            return f"What is {faces[j].name} holding?", f"A {colour} {kind}.", {"answer": f"{colour} {kind}"}, "region"
        if style == "holder":
            return f"Who holds the {colour} {kind}?", f"{faces[j].name}.", {"answer": faces[j].name}, "region"
        a, b = rng.sample(named, 2)
        yes = a < b  # faces are listed left to right
        answer = "Yes." if yes else "No."
        return f"Is {faces[a].name} left of {faces[b].name}?", answer, {"answer": "yes" if yes else "no"}, "region"


def build_scenes_vqa(out_dir: str | Path, config: ScenesConfig = ScenesConfig(), *, overwrite: bool = False) -> dict:
    """Draw the identities, split them, and write train.json, eval_seen.json, eval.json, scenes/,
    crops/, embeddings.safetensors and manifest.json to `out_dir`.

    Raises:
        FileExistsError: `out_dir` already holds a dataset and `overwrite` is False (nothing is touched).
    """
    from safetensors.numpy import save

    from .sources import synthetic_photos

    out = Path(out_dir)
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a VQA dataset; pass overwrite=True (--overwrite) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scenes").mkdir(exist_ok=True)
    photos = synthetic_photos(out, config.num_identities, config.photos_per_identity, seed=config.seed)
    rng = np.random.default_rng(config.seed)
    centres = rng.standard_normal((config.num_identities, config.embedding_dim)).astype(np.float32)
    table = np.zeros((len(photos), config.embedding_dim), dtype=np.float32)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row, p in enumerate(photos):
        label = int(p.identity.split("_")[-1])
        table[row] = centres[label] / np.sqrt(config.embedding_dim) + config.embedding_noise * rng.standard_normal(
            config.embedding_dim
        ).astype(np.float32) / np.sqrt(config.embedding_dim)
        crop = Path(p.crop).resolve().relative_to(out.resolve()).as_posix()  # type: ignore[arg-type]
        by_id.setdefault(p.identity, []).append({"photo": p.photo, "crop": crop, "embedding": row})
    ids = sorted(by_id)
    random.Random(f"scenes-split-{config.seed}").shuffle(ids)
    unseen, seen = sorted(ids[: config.num_unseen]), sorted(ids[config.num_unseen :])
    pool = generate_names(config.name_pool_size, config.seed)
    random.Random(f"scenes-names-{config.seed}").shuffle(pool)
    n_eval = int(round(config.name_pool_size * config.eval_name_fraction))
    eval_names, train_names = sorted(pool[:n_eval]), sorted(pool[n_eval:])

    def people(idents: list[str], photo_slice: slice) -> dict[str, _Person]:
        return {i: _Person(i, by_id[i][0], by_id[i][1:][photo_slice]) for i in idents}

    # Seen people: the last scene photo is held out for eval_seen; unseen people use all of theirs.
    splits = {
        "train": _SceneWriter(out, people(seen, slice(0, -1)), train_names, table, config, "train"),
        "eval_seen": _SceneWriter(out, people(seen, slice(-1, None)), eval_names, table, config, "eval_seen"),
        "eval": _SceneWriter(out, people(unseen, slice(None)), eval_names, table, config, "eval"),
    }
    written: dict[str, int] = {}
    for which, writer in splits.items():
        count = config.train_per_task if which == "train" else config.eval_per_task
        samples = [writer.sample(t, f"{which}-{t}-{j:05d}") for t in config.tasks for j in range(count)]
        _write_atomic(out / f"{which}.json", dump_samples(samples).encode("utf-8"))
        written[which] = len(samples)
    _write_atomic(out / "embeddings.safetensors", save({"embeddings": table}))
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "scenes",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "seen_identities": seen,
        "unseen_identities": unseen,
        "vocabulary": sorted(train_names + eval_names),
        "num_samples": written,
        "embeddings": {"file": "embeddings.safetensors", "rows": int(table.shape[0]), "dim": int(table.shape[1])},
    }
    _write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


__all__ = ["COLOURS", "OBJECTS", "SCENE_TASKS", "ScenesConfig", "build_scenes_vqa", "draw_object", "render_scene"]
