"""Verified identity tokens: tie each open-set reference to the picture face it matches.

In open-set token mode (`lvface_mm.vqa.binding`) a prompt carries the picture's faces and the
gallery's candidates, each candidate a name next to the identity tokens of its enrolled reference.
Left to itself, the LLM has to discover that a face's tokens and its reference's tokens (two
different photos, cosine ~0.5-0.7 in LVFace space) belong together: an attention circuit that
compares 512-d identities, which small models did not learn in our budgets (docs/adapter_training.md,
section 5). The encoder already answers that question well; this module hands its answer to the LLM
in the tokens themselves:

    face i       ->  normalise(projector(e_i) + slot_i) * norm                  (F, K, d)
    reference r  ->  normalise(projector(t_r) + sum_i g_ir slot_i) * norm       (R, K, d)
    g_ir = sigmoid(s * (cos(e_i, t_r) - b))                                     (F, R)

`slot_i` is a learned vector per face position, `b` (threshold) and `s` (sharpness) are learned
scalars. A reference that matches face i carries face i's slot, so "which reference is this face?"
becomes "which reference token shares my slot", an equality an attention head reads directly (the
induction pattern pretrained LLMs already have); a reference that matches no face carries none,
which is how the model learns "an unknown person". Nothing is tied to a person: the slots are
positions and the gate reads cosines, so people enrolled after training bind like the rest.

Faces without references (closed-set token mode) are left exactly as the projector made them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceMatcher(nn.Module):
    """Learned face slots and a cosine gate (see the module docstring).

    Args:
        out_dim: the LLM's hidden size (width of the identity tokens).
        max_faces: most picture faces a prompt may bind (slots are per position).
        threshold: initial gate centre `b` on the LVFace cosine (0.3: between the impostor and
            genuine cosines of LVFace; the gallery's default threshold is of the same order).
        sharpness: initial gate slope `s` (20: the gate goes from 0.12 to 0.88 over +-0.1 cosine).
    """

    def __init__(self, out_dim: int, max_faces: int = 16, threshold: float = 0.3, sharpness: float = 20.0) -> None:
        super().__init__()
        if not isinstance(max_faces, int) or max_faces < 1:
            raise ValueError(f"ReferenceMatcher.max_faces must be an int >= 1, got {max_faces!r}")
        if not sharpness > 0:
            raise ValueError(f"ReferenceMatcher.sharpness must be > 0, got {sharpness!r}")
        generator = torch.Generator().manual_seed(0)  # the same slots for every fresh adapter
        # Random directions in a wide space are nearly orthogonal: each position its own signature.
        self.slots = nn.Parameter(torch.randn(max_faces, out_dim, generator=generator))  # (S, d)
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))
        self.log_sharpness = nn.Parameter(torch.tensor(math.log(sharpness)))

    @property
    def max_faces(self) -> int:
        return int(self.slots.shape[0])

    def gates(self, faces: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """(F, D) and (R, D) L2-normalised embeddings -> (F, R) match gates in (0, 1)."""
        cosine = faces.float() @ references.float().T  # (F, R)
        return torch.sigmoid(self.log_sharpness.exp() * (cosine - self.threshold))

    def forward(
        self, tokens: torch.Tensor, embeddings: torch.Tensor, num_faces: int, norm: torch.Tensor
    ) -> torch.Tensor:
        """Bind references to faces.

        Args:
            tokens: (F + R, K, d) projector outputs: the picture's faces first, then the references.
            embeddings: (F + R, D) their L2-normalised LVFace embeddings, in the same order.
            num_faces: F.
            norm: the projector's output norm (every token keeps it).
        Returns:
            (F + R, K, d); unchanged when there are no references.
        """
        total = int(tokens.shape[0])
        if not 0 <= num_faces <= total:
            raise ValueError(f"num_faces={num_faces} for {total} identity-token groups")
        if num_faces == total or num_faces == 0:
            return tokens
        if num_faces > self.max_faces:
            raise ValueError(
                f"{num_faces} faces in one prompt; this adapter binds references to at most {self.max_faces}"
            )
        if embeddings.shape[0] != total:
            raise ValueError(f"{embeddings.shape[0]} embeddings for {total} identity-token groups")
        slots = F.normalize(self.slots[:num_faces].float(), dim=-1)  # (F, d) unit
        gates = self.gates(embeddings[:num_faces], embeddings[num_faces:])  # (F, R)
        added = torch.cat([slots, gates.T @ slots])  # (F + R, d): own slot / gated sum of matched slots
        bound = tokens.float() + (norm.float() * added)[:, None, :]  # (F + R, K, d)
        return (F.normalize(bound, dim=-1) * norm.float()).to(tokens.dtype)


def bind_references(
    projector: nn.Module, tokens: torch.Tensor, embeddings: torch.Tensor, num_faces: int
) -> torch.Tensor:
    """`projector.matcher(...)` when the projector has one, else `tokens` unchanged."""
    matcher = getattr(projector, "matcher", None)
    if matcher is None:
        return tokens
    embeddings = F.normalize(embeddings.to(device=tokens.device, dtype=torch.float32), dim=-1)
    return matcher(tokens, embeddings, num_faces, projector.output_norm)


def bind_face_inputs(
    adapter: nn.Module, tokens: torch.Tensor, faces: torch.Tensor, num_faces: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`bind_references` for a sample's face inputs: (N, D) embeddings as they are, (N, 3, 112, 112)
    crops through the encoder, and only when the projector has a matcher and there are references.

    Returns:
        (bound tokens, the (N, D) embeddings the gate read, or None when nothing was bound), so
        region features (`regions.add_region_features`) gate with the same embeddings.
    """
    if getattr(adapter.projector, "matcher", None) is None or num_faces == len(tokens):
        return tokens, None
    embeddings = faces if faces.ndim == 2 else adapter.embed(faces)  # (N, D)
    return bind_references(adapter.projector, tokens, embeddings, num_faces), embeddings


__all__ = ["ReferenceMatcher", "bind_face_inputs", "bind_references"]
