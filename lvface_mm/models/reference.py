"""An eager re-implementation of the official LVFace forward, for parity tests and benchmarks.

It follows the upstream `backbones/vit.py` (InsightFace `arcface_torch`, shipped unchanged by
LVFace) operation by operation, so it is the yardstick `FaceViT` is measured against:

    - attention is spelt out: softmax(q @ k^T * head_dim**-0.5) @ v, in float32 with autocast off;
    - on a CUDA device the qkv projection, the output projection and the whole MLP residual branch
      run under fp16 autocast, as upstream hard-codes; on CPU autocast is inert, everything is fp32;
    - the final LayerNorm casts its input to float32;
    - the head flattens all 144 tokens (token-major) into Linear -> BN -> Linear -> BN.

It is inference-only (no token masking, no stochastic depth, no gradient checkpointing) and keeps
the official parameter names, so `ReferenceFaceViT(config).load_state_dict(official_sd)` is strict.
Nothing in the library's own inference path uses it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .facevit import FaceViTConfig


def _cuda_autocast(x: torch.Tensor, enabled: bool) -> contextlib.AbstractContextManager:
    # Upstream wraps these regions in `torch.cuda.amp.autocast(enabled)`. That context only acts on
    # CUDA tensors, so on CPU (and in ONNX) it changes nothing; mirror that without the CPU warning.
    if x.is_cuda:
        return torch.autocast("cuda", dtype=torch.float16, enabled=enabled)
    return contextlib.nullcontext()


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        with _cuda_autocast(x, True):
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        with _cuda_autocast(x, False):
            q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()  # each (B, H, N, hd)
            weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, N, N)
            x = (weights @ v).transpose(1, 2).reshape(B, N, D)
        with _cuda_autocast(x, True):
            return self.proj(x)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, config: FaceViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-5)
        self.attn = _Attention(config.embed_dim, config.num_heads)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-5)
        self.mlp = _Mlp(config.embed_dim, config.mlp_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        with _cuda_autocast(x, True):
            # fp32 residual + fp16 branch promotes back to fp32, as upstream
            return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, config: FaceViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, stride=config.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class ReferenceFaceViT(nn.Module):
    """The upstream forward, eval only. Same state-dict keys as `FaceViT` and the official `.pt`."""

    def __init__(self, config: FaceViTConfig) -> None:
        super().__init__()
        self.config = config
        D, N = config.embed_dim, config.num_patches
        self.patch_embed = _PatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, N, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))  # unused at inference; kept for the key layout
        self.blocks = nn.ModuleList([_Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(D, eps=1e-5)
        self.feature = nn.Sequential(
            nn.Linear(N * D, D, bias=False),
            nn.BatchNorm1d(D, eps=2e-5),
            nn.Linear(D, config.feature_dim, bias=False),
            nn.BatchNorm1d(config.feature_dim, eps=2e-5),
        )
        self.eval()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_features(x)  # (B, N, D)
        return self.feature(tokens.reshape(tokens.shape[0], -1))  # raw (B, feature_dim), not normalised


def reference_from(model: nn.Module) -> ReferenceFaceViT:
    """A `ReferenceFaceViT` with the weights of a `FaceViT` (same device and dtype), in eval mode."""
    ref = ReferenceFaceViT(model.config)
    ref.load_state_dict(model.state_dict(), strict=True)
    param = next(model.parameters())
    return ref.to(device=param.device, dtype=param.dtype).eval()
