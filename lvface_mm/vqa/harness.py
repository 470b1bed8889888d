"""The identity-grounded VQA harness: one evaluation set, several ways of telling a VLM who is who.

Modes (all answer the same samples with the same model, side by side in one report; every prompt
is rendered in the one prompt format of `rendering.py`, the picture included for VLMs):

    token         identity tokens: each face becomes K projected LVFace tokens (the trained adapter;
                  with an untrained projector this is the "untrained adapter" control); names only
                  through the candidates' reference tokens when samples carry them (open-set)
    prompt        prompt grounding: faces matched against a gallery at a threshold calibrated at a
                  chosen FAR, names, positions and boxes written into the prompt (no training)
    som           prompt grounding with numbered boxes drawn on the picture (Set-of-Mark)
    token+prompt  identity tokens and the gallery's names
    plain         the plain model: no identity information at all

The gallery for prompt grounding is enrolled from the *training* photos of the enrolled people
(never from evaluation photos) and calibrated on them, the way a user would set one up.

With LoRA on the encoder, `verification_before_after` adds TAR@FAR of the encoder with the adapter
switched off and on, over all pairs of the evaluation faces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import FaceStore
from .metrics import score_predictions
from .schema import FACE_REF_RE, Sample, Turn

MODES = ("token", "prompt", "som", "token+prompt", "plain")
_GALLERY_MODES = ("prompt", "som", "token+prompt")
_SPACES = re.compile(r"[ \t]+")


@dataclass(frozen=True)
class HarnessConfig:
    """How answers are generated.

    Args:
        modes: which of `MODES` to run.
        batch_size: prompts per `generate` call.
        max_new_tokens: answer length limit.
        far: false-accept rate at which the prompt-grounding gallery's threshold is calibrated.
        max_per_task: evaluate at most this many samples per task (None = all).
    """

    modes: tuple[str, ...] = MODES
    batch_size: int = 16
    max_new_tokens: int = 32
    far: float = 1e-3
    max_per_task: int | None = None

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"HarnessConfig.modes: unknown mode(s) {bad}; choose from {list(MODES)}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"HarnessConfig: batch_size and max_new_tokens must be >= 1, got {self.batch_size}, "
                f"{self.max_new_tokens}"
            )
        if not 0.0 < self.far < 1.0:
            raise ValueError(f"HarnessConfig.far must be in (0, 1), got {self.far}")


def subsample(samples: Sequence[Sample], max_per_task: int | None) -> list[Sample]:
    """The first `max_per_task` samples of each task, in file order."""
    if max_per_task is None:
        return list(samples)
    seen: dict[str, int] = {}
    out = []
    for s in samples:
        if seen.get(s.task, 0) < max_per_task:
            seen[s.task] = seen.get(s.task, 0) + 1
            out.append(s)
    return out


# -- prompts per mode ---------------------------------------------------------------------------


def _strip_refs(text: str) -> str:
    lines = [_SPACES.sub(" ", FACE_REF_RE.sub("", line)).strip() for line in text.split("\n")]
    return "\n".join(line for line in lines if line.strip(" .:"))


def plain_sample(sample: Sample) -> Sample:
    """The sample with every face reference removed from its prompt."""
    turns = tuple(Turn(t.role, _strip_refs(t.text) if t.role != "assistant" else t.text) for t in sample.turns)
    return replace(sample, turns=turns)


def face_embeddings(adapter: Any, faces: FaceStore, sample: Sample) -> np.ndarray:
    """(F, D) L2-normalised identity embeddings of a sample's faces (from the table, or the encoder)."""
    feats = faces.load(sample)
    if faces.mode == "embedding":
        return F.normalize(feats.float(), dim=-1).numpy()
    return adapter.embed(feats).float().cpu().numpy()


def build_gallery(train: Sequence[Sample], faces: FaceStore, adapter: Any = None, far: float = 1e-3) -> Any:
    """An in-memory gallery of the enrolled people, from their training photos, calibrated at `far`.

    `adapter` (the `IdentityAdapter`) embeds crops when `faces` holds crops rather than embeddings.
    """
    from ..gallery import Gallery, calibrate

    photos: dict[str, tuple[str, Sample, int]] = {}
    for s in train:
        for i, f in enumerate(s.faces):
            if f.name and f.photo is not None and f.photo not in photos:
                photos[f.photo] = (f.name, s, i)
    names = [name for name, _, _ in photos.values()]
    if len(set(names)) < 2:
        raise ValueError("build_gallery needs training photos of at least two enrolled people")
    if faces.mode == "crop" and adapter is None:
        raise ValueError("build_gallery: crops need the adapter's encoder to embed them (pass adapter=)")
    emb = np.stack([face_embeddings(adapter, faces, s)[i] for _, s, i in photos.values()])  # (N, D)
    threshold = calibrate(emb, names, far=far, allow_extrapolation=True).threshold
    gallery = Gallery(":memory:", feature_dim=emb.shape[1], threshold=threshold)
    for name in sorted(set(names)):
        gallery.enrol(name, emb[[i for i, n in enumerate(names) if n == name]])
    return gallery


# -- generation ---------------------------------------------------------------------------------


def face_tokens(adapter: Any, faces: torch.Tensor) -> torch.Tensor:
    """(F, D) embeddings or (F, 3, 112, 112) crops -> (F, K, d) identity tokens."""
    from ..vlm.projectors import FaceFeatures

    projector = adapter.projector
    dtype = next(projector.parameters()).dtype
    device = next(projector.parameters()).device
    if faces.ndim == 2:
        return projector(FaceFeatures(pooled=F.normalize(faces.to(device=device, dtype=dtype), dim=-1)))
    return adapter.encode(faces.to(device))


def end_of_turn_ids(vlm: Any) -> list[int]:
    """Token ids that end an answer in this model's template (its end-of-turn marker and EOS)."""
    family, processor = vlm.family, vlm.processor.processor
    tokenizer = vlm.processor.tokenizer
    messages = [{"role": "user", "content": family.user_content("hi", 0)}]
    stops = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    try:
        prompt = family.render_prompt(processor, messages)
        tail = family.render_answer(processor, messages, "ok")[len(prompt) :].split("ok", 1)[-1].strip()
    except ValueError:
        return sorted(stops)
    ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
    if ids:
        stops.add(int(ids[0]))
    return sorted(stops)


@torch.no_grad()
def generate_answers(
    vlm: Any,
    samples: Sequence[Sample],
    faces: FaceStore,
    mode: str = "token",
    batch_size: int = 16,
    max_new_tokens: int = 32,
    names: dict[str, list[str | None]] | None = None,
) -> dict[str, str]:
    """Greedy answers to each sample's question in `mode`, keyed by sample id.

    Args:
        vlm: the `IdentityVLM`.
        samples: evaluation samples.
        faces: where the faces' embeddings/crops (and the pictures) come from.
        mode: a prompt mode of `rendering.MODES`.
        batch_size, max_new_tokens: generation settings.
        names: per sample id, the name shown for each face (a gallery's decisions; gallery modes).
    """
    from ..vlm.matching import bind_face_inputs
    from .rendering import SampleRenderer, identity_inputs, writes_own_references

    renderer = SampleRenderer(vlm, faces.root, mode)
    stops = end_of_turn_ids(vlm)
    tokenizer = vlm.processor.tokenizer
    answers: dict[str, str] = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        texts, images, counts, tokens, regions, embeddings = [], [], [], [], [], []
        for s in chunk:
            text, imgs, _ = renderer.prompt(s, None if names is None else names.get(s.id))
            texts.append(text)
            images.append(None if imgs is None else imgs[0])
            n = renderer.face_count(s) if (renderer.uses_tokens or writes_own_references(s)) else 0
            counts.append(n)
            if n:
                inputs = identity_inputs(renderer, faces, s)  # (F [+ R], ...)
                bound, embedded = bind_face_inputs(vlm.adapter, face_tokens(vlm.adapter, inputs), inputs, len(s.faces))
                tokens.append(bound)
                regions.append(renderer.region_boxes(s))
                embeddings.append(embedded)  # the matcher's gate also decides which references share a region
            else:
                tokens.append(torch.zeros(0, vlm.config.num_id_tokens, vlm.adapter.projector.spec.out_dim))
                regions.append(None)
                embeddings.append(None)
        pictures = None if all(i is None for i in images) else images
        inputs = vlm.processor(texts, images=pictures, num_faces=counts)
        tokens = vlm.add_regions(inputs, tokens, regions, embeddings)
        new = vlm.generate_ids(inputs, tokens, max_new_tokens=max_new_tokens, eos_token_id=stops)
        for s, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
            answers[s.id] = text.strip()
    return answers


def gallery_names(vlm: Any, samples: Sequence[Sample], faces: FaceStore, gallery: Any) -> dict[str, list[str | None]]:
    """The gallery's decision (name or None) for every face of every sample."""
    out: dict[str, list[str | None]] = {}
    for s in samples:
        if s.faces:
            out[s.id] = [r.name for r in gallery.identify(face_embeddings(vlm.adapter, faces, s))]
    return out


class ReferenceGallery:
    """The gallery of open-set samples: each sample's candidates, matched at one calibrated threshold.

    Open-set samples name people per sample, so a fixed name->identity gallery cannot serve them;
    the gallery's decision for a face is the best of the sample's references whose cosine reaches
    `threshold` (calibrated on training faces at a FAR), else unknown.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    @classmethod
    def calibrated(
        cls, train: Sequence[Sample], faces: FaceStore, adapter: Any = None, far: float = 1e-3
    ) -> ReferenceGallery:
        from ..gallery import calibrate

        picked: dict[str, tuple[str, Sample, int]] = {}
        for s in train:
            for i, f in enumerate(s.faces):
                if f.identity is not None and f.photo is not None:
                    picked.setdefault(f.photo, (f.identity, s, i))
        labels = [ident for ident, _, _ in picked.values()]
        emb = np.stack([face_embeddings(adapter, faces, s)[i] for _, s, i in picked.values()])
        return cls(calibrate(emb, labels, far=far, allow_extrapolation=True).threshold)

    def names(self, adapter: Any, faces: FaceStore, sample: Sample) -> list[str | None]:
        refs = sample.meta.get("references") or []
        if not refs:
            return [None] * len(sample.faces)
        emb = face_embeddings(adapter, faces, sample)  # (F, D)
        ref_feats = faces.load_references(sample)
        ref = (
            F.normalize(ref_feats.float(), dim=-1).numpy()
            if faces.mode == "embedding"
            else (adapter.embed(ref_feats).float().cpu().numpy())
        )
        scores = emb @ ref.T  # (F, R)
        best = scores.argmax(axis=1)
        return [refs[int(b)]["name"] if scores[i, b] >= self.threshold else None for i, b in enumerate(best)]


def decision_disagreements(
    samples: Sequence[Sample], answers: Mapping[str, str], names: Mapping[str, list[str | None]]
) -> dict[str, int]:
    """Where token mode and the gallery's threshold decision disagree on the asked face, and who is right.

    Counts over naming/unknown samples with `meta.face`: both right, both wrong, token right and
    gallery wrong, gallery right and token wrong (the asked person's expected name, or abstention).
    """
    from .metrics import NameMatcher, is_abstention

    vocab = {n for s in samples for r in s.meta.get("references") or () for n in [r["name"]]}
    vocab |= {n for v in names.values() for n in v if n}
    matcher = NameMatcher(vocab)
    out = {"both_right": 0, "both_wrong": 0, "token_right_gallery_wrong": 0, "gallery_right_token_wrong": 0}
    for s in samples:
        k = s.meta.get("face")
        if s.task not in ("naming", "unknown") or k is None or s.id not in answers:
            continue
        truth = s.faces[k].name
        said = matcher.find(answers[s.id])
        token_ok = said == {truth} if truth else (not said and is_abstention(answers[s.id]))
        gallery_ok = names.get(s.id, [None] * len(s.faces))[k] == truth
        key = (
            ("both_right" if gallery_ok else "token_right_gallery_wrong")
            if token_ok
            else ("gallery_right_token_wrong" if gallery_ok else "both_wrong")
        )
        out[key] += 1
    return out


def run_modes(
    vlm: Any,
    samples: Sequence[Sample],
    faces: FaceStore,
    config: HarnessConfig = HarnessConfig(),
    gallery: Any = None,
    vocabulary: Sequence[str] = (),
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """Answer `samples` in every configured mode and score them.

    Returns:
        (mode -> metrics, mode -> {sample id -> answer}).
    """
    samples = subsample(samples, config.max_per_task)
    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, dict[str, str]] = {}
    names = None
    if any(m in _GALLERY_MODES for m in config.modes) or isinstance(gallery, ReferenceGallery):
        if gallery is None:
            raise ValueError(f"modes {list(_GALLERY_MODES)} need a gallery (see build_gallery)")
        if isinstance(gallery, ReferenceGallery):
            names = {s.id: gallery.names(vlm.adapter, faces, s) for s in samples if s.faces}
        else:
            names = gallery_names(vlm, samples, faces, gallery)
    for mode in config.modes:
        if mode == "token":
            prompts = list(samples)  # LLaVA-style samples keep the references they write
        else:
            # Without references the renderer writes the grounding paragraph itself (gallery modes).
            prompts = [plain_sample(s) for s in samples]
        shown = names if mode in _GALLERY_MODES else None
        answers[mode] = generate_answers(vlm, prompts, faces, mode, config.batch_size, config.max_new_tokens, shown)
        results[mode] = score_predictions(samples, answers[mode], vocabulary)
        if mode == "token" and names is not None:
            results[mode]["decision_vs_gallery"] = decision_disagreements(samples, answers[mode], names)
    return results, answers


ENCODER_LORA_DIR = "encoder_lora"


def load_trained_vlm(adapter_dir: str | Path, **kwargs: Any) -> Any:
    """An `IdentityVLM` with an adapter written by `training/adapter.py` (projector, LLM LoRA and,
    when the encoder was tuned, its LoRA in `encoder_lora/`). `kwargs` go to `IdentityVLM.from_pretrained`."""
    from ..tasks.encoder_lora import load_adapter
    from ..vlm import IdentityVLM

    vlm = IdentityVLM.from_pretrained(adapter_dir, adapter=adapter_dir, **kwargs)
    if (Path(adapter_dir) / ENCODER_LORA_DIR).is_dir():
        load_adapter(vlm.adapter.encoder, Path(adapter_dir) / ENCODER_LORA_DIR)
    vlm.model.eval()
    return vlm


# -- encoder verification -------------------------------------------------------------------------


@torch.no_grad()
def verification_before_after(
    encoder_lora: Any, crops: torch.Tensor, labels: Sequence[str], fars: Sequence[float] = (1e-2, 1e-1)
) -> dict[str, dict[str, float]]:
    """TAR@FAR over all pairs of `crops` with the encoder's LoRA off ("before") and on ("after").

    Args:
        encoder_lora: the PEFT-wrapped FaceViT.
        crops: (N, 3, 112, 112) normalised aligned crops.
        labels: identity of each crop.
        fars: false-accept rates to report.
    """
    from ..eval.roc import tar_at_fars
    from ..gallery import pair_scores

    out: dict[str, dict[str, float]] = {}
    param = next(encoder_lora.parameters())
    crops = crops.to(device=param.device, dtype=param.dtype)
    for stage in ("before", "after"):
        if stage == "before":
            with encoder_lora.disable_adapter():
                emb = encoder_lora(crops, normalize=True)
        else:
            emb = encoder_lora(crops, normalize=True)
        genuine, impostor = pair_scores(emb.float().cpu().numpy(), list(labels))
        scores = np.concatenate([genuine, impostor])
        truth = np.concatenate([np.ones(len(genuine), bool), np.zeros(len(impostor), bool)])
        _, points = tar_at_fars(truth, scores, fars)
        out[stage] = {f"TAR@FAR={p.far:g}": p.tar_interpolated for p in points}
    return out


__all__ = [
    "MODES",
    "HarnessConfig",
    "ReferenceGallery",
    "build_gallery",
    "decision_disagreements",
    "end_of_turn_ids",
    "gallery_names",
    "face_embeddings",
    "face_tokens",
    "generate_answers",
    "load_trained_vlm",
    "plain_sample",
    "run_modes",
    "subsample",
    "verification_before_after",
]
