"""Open-set binding samples: name people the model never saw, from references in the context.

In token mode each face of the picture is K identity tokens; the context also lists the gallery's
top candidates for the picture's faces, each as a name in plain text next to the identity tokens
of its enrolled reference photo (`meta.references`, rendered by `rendering.py`). The model's job is
matching: which reference's tokens resemble this face's tokens, then copy that reference's name.
Nothing about a particular person is memorised, so a person enrolled after training is named with
no retraining, and a face whose identity is not among the candidates is "an unknown person".

What makes the task unlearnable by memorising:
- names are drawn per sample from a large generated pool (never one fixed name per identity);
- candidates come from the gallery's own search over every identity of the split (so look-alikes,
  i.e. wrong candidates, are included), and the true identity is sometimes left out (-> unknown);
- evaluation splits by identity and by name: evaluation people and their names never occur in
  training.

Each identity gives one photo as its enrolled reference (the gallery's enrolment) and the others
as scene photos, so a face and its reference are always different photos.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .builder import (
    _GAP,
    CROP_SIZE,
    FORMAT_VERSION,
    UNKNOWN_PERSON,
    FacePhoto,
    _relative_crop,
    _write_atomic,
    generate_names,
    position_words,
)
from .schema import Face, Sample, Turn, dump_samples

BINDING_TASKS = ("naming", "unknown")


@dataclass(frozen=True)
class BindingConfig:
    """How to split identities and names and how many samples to write.

    Args:
        seed: every random choice derives from it.
        num_eval_identities: identities held out for evaluation (never in training).
        name_pool_size: names generated in all; split into training and evaluation names.
        eval_name_fraction: share of the pool reserved for evaluation.
        num_candidates: references shown per sample (the gallery's top candidates).
        omit_true_prob: chance that the asked face's identity is left out of the candidates
            (the answer is then "an unknown person").
        train_per_task / eval_per_task: samples per task and split.
        max_faces: most people in one picture.
        tasks: subset of `BINDING_TASKS`.
    """

    seed: int = 0
    num_eval_identities: int = 8
    name_pool_size: int = 600
    eval_name_fraction: float = 0.25
    num_candidates: int = 3
    omit_true_prob: float = 0.2
    train_per_task: int = 400
    eval_per_task: int = 50
    max_faces: int = 2
    tasks: tuple[str, ...] = BINDING_TASKS

    def __post_init__(self) -> None:
        for key in ("num_eval_identities", "name_pool_size", "num_candidates", "max_faces"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BindingConfig.{key} must be an int >= 1, got {value!r}")
        for key in ("train_per_task", "eval_per_task"):
            if getattr(self, key) < 0:
                raise ValueError(f"BindingConfig.{key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("eval_name_fraction", "omit_true_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"BindingConfig.{key} must be in [0, 1], got {getattr(self, key)!r}")
        bad = [t for t in self.tasks if t not in BINDING_TASKS]
        if bad or not self.tasks:
            raise ValueError(f"BindingConfig.tasks: unknown task(s) {bad}; choose from {list(BINDING_TASKS)}")


@dataclass(frozen=True)
class _Side:
    """One split: its identities, each identity's reference and scene photos, and its names."""

    identities: list[str]
    reference: dict[str, FacePhoto]
    scenes: dict[str, list[FacePhoto]]
    names: list[str]


def split_binding(photos: Sequence[FacePhoto], config: BindingConfig) -> tuple[_Side, _Side]:
    """Identities and names for training and evaluation, disjoint on both."""
    by_id: dict[str, list[FacePhoto]] = {}
    for p in photos:
        by_id.setdefault(p.identity, []).append(p)
    eligible = sorted(i for i, ps in by_id.items() if len(ps) >= 2)  # a reference and a scene photo
    need = config.num_eval_identities + max(config.num_candidates, config.max_faces) + 1
    if len(eligible) < need:
        raise ValueError(
            f"the source has {len(eligible)} identities with >= 2 photos; open-set binding needs at least {need} "
            f"({config.num_eval_identities} for evaluation and enough for {config.num_candidates} candidates)"
        )
    rng = random.Random(f"binding-{config.seed}")
    rng.shuffle(eligible)
    eval_ids, train_ids = sorted(eligible[: config.num_eval_identities]), sorted(eligible[config.num_eval_identities :])
    n_eval_names = int(round(config.name_pool_size * config.eval_name_fraction))
    n_train_names = config.name_pool_size - n_eval_names
    # Each sample names up to num_candidates people: a pool smaller than that cannot give distinct names.
    for side, n in (("training", n_train_names), ("evaluation", n_eval_names)):
        if n < max(config.num_candidates, config.max_faces) * 4:
            raise ValueError(
                f"name_pool_size={config.name_pool_size} leaves {n} {side} names; need at least "
                f"{max(config.num_candidates, config.max_faces) * 4} so names cannot be memorised"
            )
    pool = generate_names(config.name_pool_size, config.seed)
    rng.shuffle(pool)
    sides = []
    for ids, names in ((train_ids, pool[n_eval_names:]), (eval_ids, pool[:n_eval_names])):
        reference, scenes = {}, {}
        for i in ids:
            ps = sorted(by_id[i], key=lambda p: p.photo)
            reference[i], scenes[i] = ps[0], ps[1:]
        sides.append(_Side(ids, reference, scenes, sorted(names)))
    return sides[0], sides[1]


def _embedding(p: FacePhoto) -> np.ndarray:
    if p.embedding is None:
        raise ValueError(f"photo {p.photo!r} has no embedding; open-set binding retrieves candidates by embedding")
    e = np.asarray(p.embedding, dtype=np.float32).reshape(-1)
    return e / max(float(np.linalg.norm(e)), 1e-12)


class _BindingMaker:
    def __init__(self, side: _Side, which: str, config: BindingConfig, rows: dict[str, int]) -> None:
        self.side, self.config, self.rows = side, config, rows
        self.rng = random.Random(f"binding-{config.seed}-{which}")
        # The gallery: one enrolled reference per identity of this split.
        self.ref_matrix = np.stack([_embedding(side.reference[i]) for i in side.identities])  # (N, D)

    def candidates(self, face: FacePhoto, k: int) -> list[str]:
        """The gallery's top-k identities for one face (nearest references, wrong ones included)."""
        scores = self.ref_matrix @ _embedding(face)  # (N,)
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.side.identities[int(j)] for j in order]

    def face(self, p: FacePhoto, name: str | None, box: tuple[float, float, float, float]) -> Face:
        return Face(
            identity=p.identity, name=name, photo=p.photo, crop=p.crop, embedding=self.rows.get(p.photo), box=box
        )

    def sample(self, task: str, sid: str) -> Sample:
        rng, cfg, side = self.rng, self.config, self.side
        n = rng.randint(1, cfg.max_faces)
        people = rng.sample(side.identities, n)
        photos = [rng.choice(side.scenes[i]) for i in people]
        k = rng.randrange(n)  # the asked face
        cands = self.candidates(photos[k], cfg.num_candidates)
        drop_true = task == "unknown" or rng.random() < cfg.omit_true_prob
        if drop_true:
            cands = [c for c in self.candidates(photos[k], cfg.num_candidates + 1) if c != people[k]][
                : cfg.num_candidates
            ]
        elif people[k] not in cands:
            cands = [people[k], *cands[: cfg.num_candidates - 1]]
        rng.shuffle(cands)  # the list order must not give the answer away
        names = dict(zip(cands, rng.sample(side.names, len(cands))))
        boxes = [
            (
                float(_GAP + j * (CROP_SIZE + _GAP)),
                float(_GAP),
                float(_GAP + j * (CROP_SIZE + _GAP) + CROP_SIZE),
                float(_GAP + CROP_SIZE),
            )
            for j in range(n)
        ]
        faces = tuple(self.face(p, names.get(p.identity), b) for p, b in zip(photos, boxes))
        refs = []
        for c in cands:
            ref = side.reference[c]
            entry: dict[str, Any] = {"name": names[c], "identity": c, "photo": ref.photo}
            if ref.photo in self.rows:
                entry["embedding"] = self.rows[ref.photo]
            if ref.crop is not None:
                entry["crop"] = ref.crop
            refs.append(entry)
        where = position_words(n)[k]
        question = "Who is this?" if n == 1 else f"Who is {where}?"
        asked = faces[k].name
        answer = f"{asked}." if asked else f"This is {UNKNOWN_PERSON}."
        target: dict[str, Any] = {"names": [asked]} if asked else {}
        size = (_GAP + cfg.max_faces * (CROP_SIZE + _GAP), CROP_SIZE + 2 * _GAP)
        return Sample(
            sid,
            "naming" if asked else "unknown",
            faces,
            (Turn("user", question), Turn("assistant", answer)),
            target=target,
            meta={"face": k, "references": refs},
            image_size=size,
        )


def build_binding_vqa(
    photos: Sequence[FacePhoto],
    out_dir: str | Path,
    config: BindingConfig = BindingConfig(),
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write an open-set binding dataset to `out_dir`: train.json, eval.json (unseen people, unseen
    names), eval_seen.json (training people, unseen names), embeddings, manifest.

    Raises:
        FileExistsError: `out_dir` already holds a dataset and `overwrite` is False (nothing is touched).
        ValueError: too few identities, photos without embeddings, or a name pool too small for the split.
    """
    import json

    out = Path(out_dir)
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a VQA dataset; pass overwrite=True (--overwrite) to replace it")
    train_side, eval_side = split_binding(photos, config)  # fails before anything is written
    used = sorted(
        {
            p.photo: p
            for side in (train_side, eval_side)
            for i in side.identities
            for p in (side.reference[i], *side.scenes[i])
        }.values(),
        key=lambda p: p.photo,
    )
    for p in used:
        _embedding(p)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {p.photo: _relative_crop(p, out) for p in used}
    sides = []
    for side in (train_side, eval_side):
        sides.append(
            _Side(
                side.identities,
                {i: resolved[p.photo] for i, p in side.reference.items()},
                {i: [resolved[p.photo] for p in ps] for i, ps in side.scenes.items()},
                side.names,
            )
        )
    rows = {p.photo: j for j, p in enumerate(used)}
    # eval_seen: the training people (their photos, their references) under evaluation names, so
    # "seen vs unseen people" is measured with names the model never saw either way.
    seen = _Side(sides[0].identities, sides[0].reference, sides[0].scenes, sides[1].names)
    splits = {}
    for which, side, count in (
        ("train", sides[0], config.train_per_task),
        ("eval", sides[1], config.eval_per_task),
        ("eval_seen", seen, config.eval_per_task),
    ):
        maker = _BindingMaker(side, which, config, rows)
        splits[which] = [maker.sample(t, f"{which}-{t}-{j:05d}") for t in config.tasks for j in range(count)]
    from safetensors.numpy import save

    table = np.stack([np.asarray(p.embedding, dtype=np.float32) for p in used])  # (N, D)
    _write_atomic(out / "embeddings.safetensors", save({"embeddings": table}))
    _write_atomic(out / "train.json", dump_samples(splits["train"]).encode("utf-8"))
    _write_atomic(out / "eval.json", dump_samples(splits["eval"]).encode("utf-8"))
    _write_atomic(out / "eval_seen.json", dump_samples(splits["eval_seen"]).encode("utf-8"))
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "binding",
        "config": dict(config.__dict__),
        "train_identities": sides[0].identities,
        "eval_identities": sides[1].identities,
        "train_names": len(sides[0].names),
        "eval_names": len(sides[1].names),
        "vocabulary": sorted(sides[0].names + sides[1].names),
        "num_samples": {k: len(v) for k, v in splits.items()},
        "embeddings": {"file": "embeddings.safetensors", "rows": table.shape[0], "dim": table.shape[1]},
    }
    _write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2, default=list) + "\n").encode("utf-8"))
    return manifest


__all__ = ["BINDING_TASKS", "BindingConfig", "build_binding_vqa", "split_binding"]
