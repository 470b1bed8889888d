"""FaceViT: the plain ViT face encoder used by LVFace.

References:
    - You et al., "LVFace: Progressive Cluster Optimization for Large Vision Models in Face
      Recognition", ICCV 2025 (arXiv 2501.13420).
    - The ViT backbone of InsightFace's `arcface_torch` (`backbones/vit.py`), which LVFace ships
      unchanged.

Module and parameter names match the official checkpoints key for key (`patch_embed.proj`,
`pos_embed`, `mask_token`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`,
`feature.{0,1,2,3}`), so an official flat `.pt` loads with `strict=True`.

What differs from the reference and why:
    - Attention uses `F.scaled_dot_product_attention` (fused kernels on CPU and GPU) instead of an
      explicit softmax(QK^T)V; in fp32 the result equals the reference to float rounding.
    - No CUDA autocast is hard-coded inside the blocks. The model runs in the dtype of its
      parameters, so fp32 gives exact parity with ONNX and CPU references; bf16/fp16 is chosen by
      the caller (`model.to(torch.bfloat16)` or `torch.autocast`).
    - Token masking uses the configured `mask_ratio`. Upstream passes no ratio at the call site, so
      any `mask_ratio > 0` masks 10% of tokens there; set `mask_ratio=0.1` to reproduce that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data_config import facevit_pretrained_cfg


@dataclass(frozen=True)
class FaceViTConfig:
    """Architecture of a FaceViT. Frozen: derive a new config with `dataclasses.replace`."""

    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    img_size: int = 112
    patch_size: int = 9
    in_chans: int = 3
    feature_dim: int = 512
    drop_path_rate: float = 0.0
    mask_ratio: float = 0.0
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "img_size", "patch_size", "in_chans", "feature_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"FaceViTConfig.{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"FaceViTConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.patch_size > self.img_size:
            raise ValueError(f"FaceViTConfig.patch_size ({self.patch_size}) exceeds img_size ({self.img_size})")
        if not self.mlp_ratio > 0:
            raise ValueError(f"FaceViTConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"FaceViTConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"FaceViTConfig.mask_ratio must be in [0, 1), got {self.mask_ratio!r}")

    @property
    def grid_size(self) -> int:
        # A 9x9/stride-9 conv on 112 px gives 12x12; the last 4 rows and columns are never seen.
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def num_params(self) -> int:
        """Learnable parameters, counted from the shapes (no model needed)."""
        N, D, H, F = self.num_patches, self.embed_dim, self.mlp_hidden_dim, self.feature_dim
        stem = D * self.in_chans * self.patch_size**2 + D + N * D + D  # patch conv + bias, pos_embed, mask_token
        block = 4 * D + 3 * D * D + D * D + D + D * H + H + H * D + D  # 2 LNs, qkv (no bias), proj, fc1, fc2
        head = 2 * D + N * D * D + 2 * D + D * F + 2 * F  # final LN, Linear, BN affine, Linear, BN affine
        return stem + self.depth * block + head

    @property
    def flops_per_image(self) -> int:
        """2 x multiply-adds of one forward (patch conv, every matmul incl. QK^T and AV, the head)."""
        N, D, H = self.num_patches, self.embed_dim, self.mlp_hidden_dim
        patch = N * D * self.in_chans * self.patch_size**2
        block = N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * H  # qkv, QK^T + AV, proj, MLP
        head = N * D * D + D * self.feature_dim
        return 2 * (patch + self.depth * block + head)


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016): drop the whole residual branch."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    def __init__(self, config: FaceViTConfig) -> None:
        super().__init__()
        self.img_size = config.img_size
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.proj.in_channels or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"FaceViT expects aligned crops of shape (B, {self.proj.in_channels}, {self.img_size}, "
                f"{self.img_size}), got {tuple(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), tokens row-major over the grid


class Attention(nn.Module):
    def __init__(self, config: FaceViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=False)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim**-0.5, as upstream
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, config: FaceViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_hidden_dim)
        # LVFace/InsightFace use ReLU6, not GELU. In place: fc1's output is a fresh tensor that
        # nothing else reads, so this saves one (B, N, 4D) allocation and memory pass per block.
        self.act = nn.ReLU6(inplace=True)
        self.fc2 = nn.Linear(config.mlp_hidden_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: FaceViTConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-5)
        self.attn = Attention(config)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-5)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class FaceViT(nn.Module):
    """ViT face encoder: aligned 112x112 RGB crops in [-1, 1] -> 512-d identity embeddings.

    `forward_features` returns the (B, 144, D) normalised patch tokens, `forward_head` turns them
    into (B, feature_dim) embeddings, and `forward` does both (optionally L2-normalised).
    """

    def __init__(self, config: FaceViTConfig) -> None:
        super().__init__()
        self.config = config
        D = config.embed_dim
        self.embed_dim = D
        self.feature_dim = config.feature_dim
        self.num_features = config.feature_dim  # timm: width of forward()'s output (no classifier)
        # timm reads preprocessing from here (timm.data.resolve_model_data_config); create_model adds the name.
        self.pretrained_cfg = facevit_pretrained_cfg(config.img_size, config.in_chans)
        self.num_patches = config.num_patches
        self.grad_checkpointing = config.grad_checkpointing

        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, D))
        # Only used when tokens are masked during training; kept so official checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        # Stochastic depth grows linearly from 0 to drop_path_rate, as upstream. Plain floats (not
        # torch.linspace) so the model can be built on the meta device.
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList([Block(config, rate) for rate in rates])
        self.norm = nn.LayerNorm(D, eps=1e-5)
        # Head over all tokens (token-major flatten), keeping the upstream Sequential indices.
        self.feature = nn.Sequential(
            nn.Linear(config.num_patches * D, D, bias=False),
            nn.BatchNorm1d(D, eps=2e-5),
            nn.Linear(D, config.feature_dim, bias=False),
            nn.BatchNorm1d(config.feature_dim, eps=2e-5),
        )
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- timm-style helpers ---------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "mask_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        return {
            "stem": r"^pos_embed|^mask_token|^patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward --------------------------------------------------------------------------------
    def _random_masking(self, x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample (MAE-style). Returns kept tokens and their indices."""
        B, N, D = x.shape
        num_keep = max(1, int(N * (1.0 - ratio)))
        noise = torch.rand(B, N, device=x.device)
        keep_idx = noise.argsort(dim=1)[:, :num_keep]  # (B, K)
        kept = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
        return kept, keep_idx

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) -> (B, num_patches, embed_dim) tokens after the final LayerNorm."""
        if not x.is_floating_point():
            raise TypeError(
                f"FaceViT expects float crops scaled to [-1, 1], got {x.dtype} "
                "(lvface_mm.faces.to_model_input converts uint8 RGB crops)"
            )
        if x.dtype != self.pos_embed.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.pos_embed.dtype)  # fp32 crops into a bf16/fp16 model
        x = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        masking = self.training and self.config.mask_ratio > 0
        if masking:
            x, keep_idx = self._random_masking(x, self.config.mask_ratio)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        if masking:
            # Put the kept tokens back in place; masked slots get the learned mask token so the
            # flatten head always sees N tokens.
            B, _, D = x.shape
            full = self.mask_token.to(x.dtype).expand(B, self.num_patches, D).clone()  # (B, N, D)
            x = full.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, D), x)
        return x

    def forward_head(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, N, D) tokens -> (B, feature_dim) embedding (raw, or L2-normalised on request)."""
        emb = self.feature(tokens.reshape(tokens.shape[0], -1))  # token-major flatten: index = token*D + channel
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), normalize=normalize)

    def flops_per_image(self) -> int:
        """2 x multiply-adds of one 112x112 forward; see `FaceViTConfig.flops_per_image`."""
        return self.config.flops_per_image

