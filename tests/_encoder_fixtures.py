"""Checkpoints in the official LVFace layout, written from the published key table
(reference/lvface.md §3) and not from our model, so tests compare two independent sources."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import torch

# Published facts per release: width, depth, parameter count, GFLOPs at 112 px (2 x MACs).
OFFICIAL = {
    "lvface_t": dict(embed_dim=256, depth=12, params=19_137_792, gflops=3.01, keys=150),
    "lvface_s": dict(embed_dim=512, depth=12, params=76_023_296, gflops=11.49, keys=150),
    "lvface_b": dict(embed_dim=512, depth=24, params=113_833_472, gflops=22.87, keys=282),
    "lvface_l": dict(embed_dim=768, depth=24, params=255_684_352, gflops=50.68, keys=282),
}

HUB_REVISION = "b12702ab1f5c721748e054a66dc90e1edd1f0724"


def official_layout(embed_dim: int, depth: int, feature_dim: int = 512) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) in the order the upstream code writes its state dict."""
    D, N = embed_dim, 144
    keys: list[tuple[str, tuple[int, ...]]] = [
        ("pos_embed", (1, N, D)),
        ("mask_token", (1, 1, D)),
        ("patch_embed.proj.weight", (D, 3, 9, 9)),
        ("patch_embed.proj.bias", (D,)),
    ]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [
            (b + "norm1.weight", (D,)),
            (b + "norm1.bias", (D,)),
            (b + "attn.qkv.weight", (3 * D, D)),
            (b + "attn.proj.weight", (D, D)),
            (b + "attn.proj.bias", (D,)),
            (b + "norm2.weight", (D,)),
            (b + "norm2.bias", (D,)),
            (b + "mlp.fc1.weight", (4 * D, D)),
            (b + "mlp.fc1.bias", (4 * D,)),
            (b + "mlp.fc2.weight", (D, 4 * D)),
            (b + "mlp.fc2.bias", (D,)),
        ]
    keys += [("norm.weight", (D,)), ("norm.bias", (D,))]
    bn = ("weight", "bias", "running_mean", "running_var")
    keys += [("feature.0.weight", (D, N * D))]
    keys += [(f"feature.1.{n}", (D,)) for n in bn] + [("feature.1.num_batches_tracked", ())]
    keys += [("feature.2.weight", (feature_dim, D))]
    keys += [(f"feature.3.{n}", (feature_dim,)) for n in bn] + [("feature.3.num_batches_tracked", ())]
    return keys


def official_state_dict(
    embed_dim: int, depth: int, device: str | torch.device = "cpu", seed: int = 0
) -> OrderedDict[str, torch.Tensor]:
    """A random checkpoint in the official flat layout: fp32 tensors, int64 BN counters, plausible
    BN statistics (positive variances) so outputs are O(1) and comparisons are meaningful."""
    generator = torch.Generator().manual_seed(seed)
    meta = torch.device(device).type == "meta"
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in official_layout(embed_dim, depth):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(12345, dtype=torch.int64)  # a real scalar even in meta checkpoints
        elif meta:
            state[key] = torch.empty(shape, device="meta")
        elif key.endswith("running_var"):
            state[key] = 0.5 + 0.5 * torch.rand(shape, generator=generator)
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "feature.1.weight", "feature.3.weight")):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 2:  # Linear weights scaled by fan-in so activations stay O(1)
            state[key] = torch.randn(shape, generator=generator) * shape[1] ** -0.5
        else:
            state[key] = 0.02 * torch.randn(shape, generator=generator)
    return state


def lay_out_hub_cache(
    cache_dir: Path,
    filename: str,
    payload: Path,
    revision: str = HUB_REVISION,
    repo_id: str = "bytedance-research/LVFace",
) -> Path:
    """Place `payload` in a Hugging Face cache the way `hf download` does: a blob, a snapshot
    symlink at the pinned revision, and refs/main naming that revision."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(payload.read_bytes()).hexdigest()  # LFS blobs are named by sha256
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        shutil.copyfile(payload, blob)
    snapshot = repo / "snapshots" / revision / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
