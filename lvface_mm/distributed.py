"""Rank and world helpers that also work with one process and no process group.

Everything here is safe to call when `torch.distributed` is unavailable or not initialised: the
world is then one process of rank 0, gathers return their input and reductions are no-ops. Nothing
is started at import; the training program owns `init_process_group`.

Row sharding (`shard_range`, `gather_rows`, `slice_rows`) is how class-centre matrices, feature
banks and their optimizer state are split across ranks: contiguous slices, the first `C % W`
ranks one row longer. Checkpoints store full matrices, so a run saved on W ranks resumes on any
other number.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group exists (torch.distributed available and initialised)."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in `group` (the default group if None); 0 without a process group."""
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in `group` (the default group if None); 1 without a process group."""
    return dist.get_world_size(group) if is_distributed() else 1


def is_main_process(group: dist.ProcessGroup | None = None) -> bool:
    return get_rank(group) == 0


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a small bookkeeping tensor must live for a collective of `group`.

    NCCL only reduces CUDA tensors (the current device); gloo, MPI and mixed "cpu:gloo,cuda:nccl"
    groups take CPU tensors. CPU without a process group.
    """
    if is_distributed() and dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_range(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Half-open `[start, end)` slice of `num_items` rows owned by `rank` out of `world_size`.

    Contiguous slices; the first `num_items % world_size` ranks own one extra row, so shard sizes
    differ by at most one. A rank may own zero rows when there are fewer rows than ranks.
    """
    if not isinstance(num_items, int) or num_items < 0:
        raise ValueError(f"shard_range: num_items must be an int >= 0, got {num_items!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"shard_range: world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"shard_range: rank must be an int in [0, {world_size}), got {rank!r}")
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    end = start + base + (1 if rank < extra else 0)
    return start, end


# --- reductions (no autograd) -------------------------------------------------------------------


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum of `x` over ranks, in place; returns `x`. No-op with one process."""
    if get_world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_reduce_max(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Element-wise max of `x` over ranks, in place; returns `x`. No-op with one process."""
    if get_world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def all_reduce_mean(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Mean of `x` over ranks, in place; returns `x`. `x` must be floating point."""
    if not x.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating-point tensor, got dtype {x.dtype}")
    world = get_world_size(group)
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        x.div_(world)
    return x


def all_gather_tensor(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate every rank's `x` along dim 0 (rank order), without autograd.

    Every rank must pass the same shape; see `all_gather_with_grad` for the differentiable version.
    """
    world = get_world_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def check_same_batch_size(batch_size: int, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
    """Raise ValueError on every rank if the ranks' batch sizes differ (gathers need equal shapes).

    One tiny all-gather; every rank sees the same sizes, so every rank raises together instead of
    one rank hanging in the next collective.
    """
    world = get_world_size(group)
    if world == 1:
        return
    sizes = all_gather_tensor(torch.tensor([batch_size], dtype=torch.int64, device=device), group).tolist()
    if len(set(sizes)) != 1:
        raise ValueError(
            f"every rank must pass the same batch size, got {sizes} (rank order); drop the last incomplete "
            "batch (DataLoader(drop_last=True)) or pad it"
        )


# --- gather with autograd ----------------------------------------------------------------------


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenation of every rank's tensor. Backward: each rank's slice of the incoming
    gradient is summed over ranks and handed to its owner (a reduce-scatter), times `grad_scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None, grad_scale: float) -> Tensor:
        ctx.group = group
        ctx.grad_scale = grad_scale
        ctx.batch = x.shape[0]
        return all_gather_tensor(x, group)  # (B*world, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        group = ctx.group
        grad = grad.contiguous()
        # Every rank holds a gradient for the whole global batch (from its own class shard); the
        # owner of rows [r*B, (r+1)*B) needs the sum of all ranks' contributions to those rows.
        chunks = list(grad.split(ctx.batch, dim=0))
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, op=dist.ReduceOp.SUM, group=group)
        if ctx.grad_scale != 1.0:
            out.mul_(ctx.grad_scale)
        return out, None, None


def all_gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None, grad_scale: float = 1.0) -> Tensor:
    """Differentiable all-gather along dim 0: (B, ...) on each rank -> (B*world, ...) on every rank.

    The backward pass sums the gradient of each rank's rows over all ranks and returns it to the
    owner, so when every rank back-propagates the same (replicated) loss, each rank gets exactly
    d loss / d its own rows. `grad_scale` multiplies that gradient; pass `world_size` when the
    parameters upstream are averaged by DDP/FSDP so the averaged gradient equals d loss / d params.
    With one process this is the identity (and `grad_scale` still applies).
    """
    if get_world_size(group) == 1:
        return x if grad_scale == 1.0 else _ScaleGrad.apply(x, grad_scale)
    return _AllGatherWithGrad.apply(x, group, grad_scale)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class _AllReduceReplicated(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity.

    Right when every rank continues with the same reduced value and back-propagates the same
    replicated loss: the loss is one function of all ranks' inputs, each rank's input enters it once
    through the sum, so d loss / d input = d loss / d sum on that rank (not the sum over ranks,
    which would count the replicated loss `world` times).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        out = x.clone()
        return all_reduce_sum(out, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def all_reduce_sum_replicated(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable sum over ranks for a loss that is replicated on every rank (identity backward)."""
    if get_world_size(group) == 1:
        return x
    return _AllReduceReplicated.apply(x, group)


# --- row sharding ------------------------------------------------------------------------------


def gather_rows(
    local: Tensor,
    num_rows: int,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str | None = "cpu",
) -> Tensor:
    """Reassemble a row-sharded tensor: this rank's `shard_range` slice -> all `num_rows` rows.

    Collective: every rank must call it and every rank gets the full tensor. Works for any per-row
    state (class centres, feature banks, optimizer moments such as AdamW's `exp_avg`). The result
    goes to `device` (CPU by default, for checkpoints); the accelerator holds at most one extra
    shard at a time because shards are broadcast one source rank after another.
    """
    rank, world = get_rank(group), get_world_size(group)
    start, end = shard_range(num_rows, rank, world)
    if local.shape[0] != end - start:
        raise ValueError(
            f"gather_rows: rank {rank} of {world} owns rows [{start}, {end}) of {num_rows}, i.e. "
            f"{end - start} rows, but the local tensor has {local.shape[0]} (shape {tuple(local.shape)})"
        )
    out_device = local.device if device is None else torch.device(device)
    full = torch.empty((num_rows, *local.shape[1:]), dtype=local.dtype, device=out_device)
    if world == 1:
        return full.copy_(local)
    for src in range(world):
        s, e = shard_range(num_rows, src, world)
        buf = local.detach().contiguous() if src == rank else local.new_empty((e - s, *local.shape[1:]))
        if e > s:  # ranks that own nothing send nothing
            dist.broadcast(buf, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
        full[s:e].copy_(buf)
    return full


def slice_rows(full: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's contiguous slice of a full row-sharded tensor (the inverse of `gather_rows`).

    Returns a view; `.clone()` it (or copy it into a parameter) before changing the full tensor.
    """
    if full.dim() == 0:
        raise ValueError("slice_rows needs a tensor with at least one dimension (rows), got a scalar")
    start, end = shard_range(full.shape[0], get_rank(group), get_world_size(group))
    return full[start:end]


__all__ = [
    "all_gather_tensor",
    "all_gather_with_grad",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_reduce_sum_replicated",
    "check_same_batch_size",
    "collective_device",
    "gather_rows",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_main_process",
    "shard_range",
    "slice_rows",
]
