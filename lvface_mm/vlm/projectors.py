"""Projectors: LVFace features -> K identity tokens in the LLM's embedding space.

Three designs behind one registry (keyed by name, like LLaVA's `mm_projector_type`):

    linear       one Linear (the original LLaVA projector)
    mlp2x_gelu   Linear -> GELU -> Linear (LLaVA-1.5)
    resampler    K learned queries cross-attending over the 144 patch tokens (Perceiver-style)

What a projector reads is the card's `embedding_source`: the pooled 512-d identity embedding, the
(144, D) patch tokens, or both (resampler only). From one pooled vector, `linear`/`mlp2x_gelu` emit
K tokens at once (output width K x d); from patch tokens they first average the 144 tokens into K
groups.

Every projector ends the same way: each token is L2-normalised and multiplied by `output_norm`,
the mean norm of the LLM's own token embeddings, measured when the adapter is attached. Token
embeddings of LLMs are small (norm ~1) while a fresh Linear's output scales with its width, and an
out-of-scale vector in the residual stream dominates attention; pinning the norm keeps identity
tokens in the range the LLM was trained on (MyVLM L2-normalises its concept vector for the same
reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import EMBEDDING_SOURCES
from .matching import ReferenceMatcher
from .regions import RegionReader


@dataclass(frozen=True)
class ProjectorSpec:
    """Shapes a projector is built for.

    Attributes:
        source: "pooled", "patch" or "both".
        pooled_dim: width of the pooled identity embedding (512 for LVFace).
        patch_dim: width of the encoder's patch tokens (its embed_dim).
        num_patches: number of patch tokens (144 for LVFace).
        out_dim: hidden size of the LLM.
        num_tokens: K, tokens per face.
        hidden_dim: projector hidden width; None = out_dim.
        reference_matching: add a `ReferenceMatcher` (`matching.py`) that binds open-set references
            to the picture face they match (needs the pooled embedding: source "pooled" or "both").
        region_features: add a `RegionReader` (`regions.py`) that pools each face's picture region.
    """

    source: str
    pooled_dim: int
    patch_dim: int
    num_patches: int
    out_dim: int
    num_tokens: int
    hidden_dim: int | None = None
    reference_matching: bool = False
    region_features: bool = False

    def __post_init__(self) -> None:
        if self.source not in EMBEDDING_SOURCES:
            raise ValueError(f"ProjectorSpec.source must be one of {EMBEDDING_SOURCES}, got {self.source!r}")
        for name in ("pooled_dim", "patch_dim", "num_patches", "out_dim", "num_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ProjectorSpec.{name} must be a positive int, got {value!r}")
        if self.hidden_dim is not None and (not isinstance(self.hidden_dim, int) or self.hidden_dim <= 0):
            raise ValueError(f"ProjectorSpec.hidden_dim must be a positive int or None, got {self.hidden_dim!r}")
        if self.num_tokens > self.num_patches and self.source != "pooled":
            raise ValueError(
                f"cannot make {self.num_tokens} tokens from {self.num_patches} patch tokens (num_tokens > num_patches)"
            )
        if not isinstance(self.reference_matching, bool):
            raise ValueError(f"ProjectorSpec.reference_matching must be a bool, got {self.reference_matching!r}")
        if self.reference_matching and self.source == "patch":
            raise ValueError("ProjectorSpec.reference_matching compares pooled embeddings: source 'pooled' or 'both'")
        if not isinstance(self.region_features, bool):
            raise ValueError(f"ProjectorSpec.region_features must be a bool, got {self.region_features!r}")


@dataclass(frozen=True)
class FaceFeatures:
    """What the encoder hands to a projector for N faces.

    Attributes:
        pooled: (N, pooled_dim) L2-normalised identity embeddings, or None.
        patches: (N, num_patches, patch_dim) patch tokens after the encoder's final norm, or None.
    """

    pooled: torch.Tensor | None = None
    patches: torch.Tensor | None = None

    @property
    def num_faces(self) -> int:
        ref = self.pooled if self.pooled is not None else self.patches
        return 0 if ref is None else int(ref.shape[0])


class Projector(nn.Module):
    """Base class: subclasses implement `project` and list the sources they read."""

    supported_sources: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: ProjectorSpec) -> None:
        super().__init__()
        if spec.source not in self.supported_sources:
            raise ValueError(
                f"{type(self).__name__} reads {self.supported_sources}, not embedding_source={spec.source!r}"
            )
        self.spec = spec
        # Persistent: a saved adapter keeps the scale it was trained with.
        self.register_buffer("output_norm", torch.ones(()))
        # Open-set binding of references to faces (trained and saved with the projector).
        self.matcher = ReferenceMatcher(spec.out_dim) if spec.reference_matching else None
        # What is around each face in the picture (trained and saved with the projector).
        self.region_reader = RegionReader(spec.out_dim) if spec.region_features else None

    def project(self, features: FaceFeatures) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: FaceFeatures) -> torch.Tensor:
        """-> (N, K, out_dim) tokens, each with norm `output_norm`."""
        self._check(features)
        tokens = self.project(features)  # (N, K, out_dim)
        return F.normalize(tokens, dim=-1) * self.output_norm.to(tokens.dtype)

    @torch.no_grad()
    def calibrate(self, norm: float) -> None:
        """Set the norm every output token gets (the LLM's mean token-embedding norm)."""
        if not norm > 0:
            raise ValueError(f"output norm must be > 0, got {norm!r}")
        self.output_norm.fill_(float(norm))

    def _check(self, features: FaceFeatures) -> None:
        s = self.spec
        pooled = features.pooled
        pooled_ok = pooled is not None and pooled.ndim == 2 and pooled.shape[-1] == s.pooled_dim
        if s.source in ("pooled", "both") and not pooled_ok:
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"{type(self).__name__} expects pooled embeddings (N, {s.pooled_dim}), got {got}")
        if s.source in ("patch", "both"):
            p = features.patches
            if p is None or p.ndim != 3 or tuple(p.shape[1:]) != (s.num_patches, s.patch_dim):
                got = None if p is None else tuple(p.shape)
                raise ValueError(
                    f"{type(self).__name__} expects patch tokens (N, {s.num_patches}, {s.patch_dim}), got {got}"
                )


# -- registry ---------------------------------------------------------------------------------------
_PROJECTORS: dict[str, type[Projector]] = {}


def register_projector(name: str) -> Callable[[type[Projector]], type[Projector]]:
    def wrap(cls: type[Projector]) -> type[Projector]:
        if name in _PROJECTORS:
            raise ValueError(f"projector {name!r} is already registered")
        _PROJECTORS[name] = cls
        return cls

    return wrap


def list_projectors() -> list[str]:
    return sorted(_PROJECTORS)


def get_projector_class(name: str) -> type[Projector]:
    if name not in _PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; known: {', '.join(list_projectors())}")
    return _PROJECTORS[name]


def create_projector(name: str, spec: ProjectorSpec) -> Projector:
    return get_projector_class(name)(spec)


def pool_patches(patches: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(N, P, D) -> (N, K, D): average P row-major patch tokens into K contiguous groups."""
    return F.adaptive_avg_pool1d(patches.transpose(1, 2), num_tokens).transpose(1, 2)


# -- projectors -----------------------------------------------------------------------------------
@register_projector("linear")
class LinearProjector(Projector):
    """One Linear. Pooled: 512 -> K*d, split into K tokens. Patch: 144 tokens pooled to K, then D -> d."""

    supported_sources = ("pooled", "patch")

    def __init__(self, spec: ProjectorSpec) -> None:
        super().__init__(spec)
        if spec.source == "pooled":
            self.proj = nn.Linear(spec.pooled_dim, spec.num_tokens * spec.out_dim)
        else:
            self.proj = nn.Linear(spec.patch_dim, spec.out_dim)

    def project(self, features: FaceFeatures) -> torch.Tensor:
        K, d = self.spec.num_tokens, self.spec.out_dim
        if self.spec.source == "pooled":
            return self.proj(features.pooled).view(-1, K, d)  # (N, K, d)
        return self.proj(pool_patches(features.patches, K))  # (N, K, d)


@register_projector("mlp2x_gelu")
class MLPProjector(Projector):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear, emitting K tokens per face."""

    supported_sources = ("pooled", "patch")

    def __init__(self, spec: ProjectorSpec) -> None:
        super().__init__(spec)
        hidden = spec.hidden_dim or spec.out_dim
        if spec.source == "pooled":
            self.fc1 = nn.Linear(spec.pooled_dim, hidden)
            self.fc2 = nn.Linear(hidden, spec.num_tokens * spec.out_dim)
        else:
            self.fc1 = nn.Linear(spec.patch_dim, hidden)
            self.fc2 = nn.Linear(hidden, spec.out_dim)
        self.act = nn.GELU()

    def project(self, features: FaceFeatures) -> torch.Tensor:
        K, d = self.spec.num_tokens, self.spec.out_dim
        if self.spec.source == "pooled":
            return self.fc2(self.act(self.fc1(features.pooled))).view(-1, K, d)  # (N, K, d)
        return self.fc2(self.act(self.fc1(pool_patches(features.patches, K))))  # (N, K, d)


@register_projector("resampler")
class ResamplerProjector(Projector):
    """K learned queries attend over the patch tokens (and the pooled embedding, with source "both").

    One pre-norm cross-attention block plus an MLP, then a Linear to the LLM width: enough to let
    each identity token pick the face regions it needs, small enough to train in stage 1.
    """

    supported_sources = ("patch", "both")

    def __init__(self, spec: ProjectorSpec) -> None:
        super().__init__(spec)
        width = spec.hidden_dim or 512
        heads = next(h for h in (8, 4, 2, 1) if width % h == 0)
        self.queries = nn.Parameter(torch.randn(spec.num_tokens, width) * 0.02)
        self.kv_proj = nn.Linear(spec.patch_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.num_patches, width))
        self.pooled_proj = nn.Linear(spec.pooled_dim, width) if spec.source == "both" else None
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.out = nn.Linear(width, spec.out_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def project(self, features: FaceFeatures) -> torch.Tensor:
        kv = self.kv_proj(features.patches) + self.pos_embed  # (N, P, W)
        if self.pooled_proj is not None:
            # The pooled identity joins as one more key: the queries can read the verified identity directly.
            kv = torch.cat([self.pooled_proj(features.pooled).unsqueeze(1), kv], dim=1)  # (N, 1+P, W)
        kv = self.norm_kv(kv)
        q = self.queries.unsqueeze(0).expand(kv.shape[0], -1, -1)  # (N, K, W)
        x = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]  # (N, K, W)
        x = x + self.mlp(self.norm_mlp(x))
        return self.out(x)  # (N, K, d)


__all__ = [
    "FaceFeatures",
    "LinearProjector",
    "MLPProjector",
    "Projector",
    "ProjectorSpec",
    "ResamplerProjector",
    "create_projector",
    "get_projector_class",
    "list_projectors",
    "pool_patches",
    "register_projector",
]
