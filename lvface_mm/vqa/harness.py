"""The identity-grounded VQA harness: one evaluation set, several ways of telling a VLM who is who.

Modes (all answer the same samples with the same model, side by side in one report):

    token    identity tokens: each face reference becomes K projected LVFace tokens (the trained
             adapter; with an untrained projector this is the "untrained adapter" control)
    prompt   prompt grounding: faces matched against a gallery at a threshold calibrated at a
             chosen FAR, names and positions written into the prompt (no training)
    plain    the plain model: face references removed, no identity information at all

The gallery for prompt grounding is enrolled from the *training* photos of the enrolled people
(never from evaluation photos) and calibrated on them, the way a user would set one up.

With LoRA on the encoder, `verification_before_after` adds TAR@FAR of the encoder with the adapter
switched off and on, over all pairs of the evaluation faces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import ConversationEncoder, FaceStore
from .metrics import score_predictions
from .schema import FACE_REF_RE, Sample, Turn

MODES = ("token", "prompt", "plain")
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


def _face_boxes(sample: Sample) -> tuple[np.ndarray, float]:
    """(F, 4) boxes and the picture width; faces without a box are laid out left to right."""
    boxes = [
        f.box if f.box is not None else (16.0 + 128.0 * i, 16.0, 128.0 * (i + 1), 128.0)
        for i, f in enumerate(sample.faces)
    ]
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return array, float(array[:, 2].max() + 16.0) if len(array) else 1.0


def plain_sample(sample: Sample) -> Sample:
    """The sample with every face reference removed from its prompt."""
    turns = tuple(Turn(t.role, _strip_refs(t.text) if t.role != "assistant" else t.text) for t in sample.turns)
    return replace(sample, turns=turns)


def prompt_grounded_sample(sample: Sample, embeddings: np.ndarray | None, gallery: Any) -> Sample:
    """The sample with the last user turn prefixed by prompt grounding (names from `gallery`)."""
    from ..vlm.grounding import ground_faces, grounding_text

    stripped = plain_sample(sample)
    if not sample.faces:
        return stripped
    boxes, width = _face_boxes(sample)
    grounded = ground_faces(boxes, width, embeddings, gallery)
    turns = list(stripped.turns)
    j = max(i for i, t in enumerate(turns) if t.role == "user")
    turns[j] = Turn("user", grounding_text(grounded) + "\n" + turns[j].text)
    return replace(stripped, turns=tuple(turns))


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


@torch.no_grad()
def generate_answers(
    vlm: Any,
    samples: Sequence[Sample],
    encoder: ConversationEncoder,
    faces: FaceStore | None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> dict[str, str]:
    """Greedy answers to each sample's prompt (all turns but the last), keyed by sample id.

    Face references in the prompts are filled with identity tokens from `faces`; samples whose
    prompt has no reference need no faces (pass `faces=None` if none has).
    """
    from ..vlm.processing import IdentityInputs

    tokenizer = vlm.processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: dict[str, str] = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        encoded = [encoder.encode_prompt(s) for s in chunk]
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(encoded):  # left padding: every row's last token is real
            ids[i, width - len(e.input_ids) :] = torch.tensor(e.input_ids)
            mask[i, width - len(e.input_ids) :] = 1
        tokens = []
        for s, e in zip(chunk, encoded):
            if e.face_order:
                if faces is None:
                    raise ValueError(f"sample {s.id!r} refers to faces but no FaceStore was given")
                tokens.append(face_tokens(vlm.adapter, faces.load(s)))
            else:
                tokens.append(torch.zeros(0, vlm.config.num_id_tokens, vlm.adapter.projector.spec.out_dim))
        inputs = IdentityInputs({"input_ids": ids, "attention_mask": mask}, tuple(tuple(e.face_order) for e in encoded))
        new = vlm.generate_ids(inputs, tokens, max_new_tokens=max_new_tokens, eos_token_id=encoder.end_of_turn_ids)
        for s, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
            answers[s.id] = text.strip()
    return answers


def run_modes(
    vlm: Any,
    samples: Sequence[Sample],
    encoder: ConversationEncoder,
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
    for mode in config.modes:
        if mode == "token":
            prompts, store = list(samples), faces
        elif mode == "plain":
            prompts, store = [plain_sample(s) for s in samples], None
        else:
            if gallery is None:
                raise ValueError("mode 'prompt' needs a gallery (see build_gallery)")
            prompts = [
                prompt_grounded_sample(s, face_embeddings(vlm.adapter, faces, s) if s.faces else None, gallery)
                for s in samples
            ]
            store = None
        answers[mode] = generate_answers(vlm, prompts, encoder, store, config.batch_size, config.max_new_tokens)
        results[mode] = score_predictions(samples, answers[mode], vocabulary)
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
    "build_gallery",
    "face_embeddings",
    "face_tokens",
    "generate_answers",
    "load_trained_vlm",
    "plain_sample",
    "prompt_grounded_sample",
    "run_modes",
    "subsample",
    "verification_before_after",
]
