"""Partial FC: margin-softmax over millions of classes, with the class centres sharded across ranks.

References:
    - An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCVW 2021, and
      "Killing Two Birds with One Stone: Efficient and Robust Training of Face Recognition CNNs by
      Partial FC", CVPR 2022.
    - InsightFace `arcface_torch/partial_fc_v2.py` (behaviour reference only; nothing copied).

How one step works (W ranks, B samples per rank, C classes, D features):

    1. every rank owns the contiguous centre rows [class_start, class_start + num_local), a plain
       per-rank `nn.Parameter`; embeddings and labels of all ranks are all-gathered -> (B*W, D);
    2. each rank keeps every centre that is a positive of the global batch and fills the budget
       int(sample_rate * num_local) with random other centres of its shard (no sampling at rate 1);
    3. cosine logits (B*W, S_local) in fp32, the margin on the target column of the owning rank
       (autocast is switched off inside the head: a bf16 cosine matmul is off by up to ~1e-3, which s = 64
       turns into logit errors of ~0.1);
    4. softmax cross-entropy over the union of all ranks' columns: row max, sum of exponentials and
       target logit are all-reduced, so the loss is identical on every rank;
    5. backward: each rank's centre gradient is exact for its shard; the embedding gradient of the
       global batch is summed across ranks and returned to the rank that owns each sample.

Per step the communication does not depend on C: one all-gather of the (B*W, D) embeddings and the
labels, three all-reduces of B*W scalars, one reduce-scatter of the embedding gradient.

Rules for the training loop:
    - Do NOT wrap this module in DDP/FSDP: every rank holds different centres. Wrap only the
      backbone. By default (`ddp_grad_scaling=True`) the embedding gradient is multiplied by W so
      that DDP's gradient averaging yields exactly d loss / d backbone parameters.
    - Build the module after `init_process_group` (the shard depends on rank and world size), and
      call it on every rank with the same per-rank batch size.
    - Optimizer state for the centres is that of a (num_local, D) parameter: each rank pays only for
      its own share.
    - Unsampled centres (sample_rate < 1): with the default dense gradient they get a zero gradient,
      but an optimizer with momentum or weight decay (AdamW, SGD momentum) still moves them, as in
      arcface_torch's V2. With `sparse_update=True` the centre gradient is a sparse row gradient
      holding only the sampled rows; pair it with `torch.optim.SparseAdam` (lazy Adam, no weight
      decay) and unsampled centres and their moments stay exactly as they are, as in the Partial FC
      paper. Clip gradients of the backbone only (sparse gradients cannot be clipped by norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import (
    all_gather_tensor,
    all_gather_with_grad,
    all_reduce_max,
    all_reduce_sum,
    check_same_batch_size,
    gather_rows,
    get_rank,
    get_world_size,
    shard_range,
    slice_rows,
)
from .margins import Margin

# Rows of centres drawn from one generator seed: init is the same for any number of ranks, and each
# rank only draws the chunks that overlap its shard.
_INIT_CHUNK_ROWS = 8192
_INIT_STD = 0.01


# --- distributed softmax ------------------------------------------------------------------------


class _TargetAndNegativeLSE(torch.autograd.Function):
    """Per row, over the columns of all ranks: the target logit and log-sum-exp of the other logits.

    Inputs: logits (N, C_local) on each rank, labels (N,) local column of the target or -1 where
    another rank owns it. Both outputs (N,) are identical on every rank. The backward treats them as
    replicated (identity through the all-reduces) and keeps a single (N, C_local) buffer: the
    normalised exponentials computed in the forward, rescaled in place.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
        rows = torch.nonzero(labels >= 0).squeeze(1)  # (n,) rows whose target column is here
        cols = labels[rows]
        target = logits.new_zeros(logits.shape[0])  # (N,)
        target[rows] = logits[rows, cols]
        all_reduce_sum(target, group)

        probs = logits.clone()  # (N, C_local); becomes exp(z - max) / sum over negatives
        probs[rows, cols] = -math.inf
        if probs.shape[1]:
            row_max = probs.amax(dim=1)
        else:  # a rank may own no sampled column
            row_max = logits.new_full((logits.shape[0],), -math.inf)
        all_reduce_max(row_max, group)
        # A row with no finite negative anywhere (a single class) keeps exp(-inf) = 0 below.
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        probs.sub_(row_max.unsqueeze(1)).exp_()
        sum_exp = all_reduce_sum(probs.sum(dim=1), group)  # (N,)
        lse = sum_exp.log() + row_max
        probs.div_(sum_exp.clamp_min(torch.finfo(probs.dtype).tiny).unsqueeze(1))
        ctx.probs = probs
        ctx.save_for_backward(rows, cols)
        return target, lse

    @staticmethod
    def backward(ctx, grad_target: Tensor, grad_lse: Tensor) -> tuple[Tensor, None, None]:
        probs = getattr(ctx, "probs", None)
        if probs is None:
            raise RuntimeError(
                "the distributed softmax reuses its buffer in place and can be back-propagated only once "
                "(retain_graph=True with a second backward is not supported)"
            )
        del ctx.probs
        rows, cols = ctx.saved_tensors
        grad = probs.mul_(grad_lse.unsqueeze(1))  # (N, C_local): d lse / d z_j = softmax over negatives
        grad[rows, cols] += grad_target[rows]
        return grad, None, None


def target_and_negative_lse(
    logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """(target logit, log-sum-exp of the non-target logits) per row, over the columns of all ranks.

    `labels[i]` is the local column of row i's target or -1 if another rank holds it; every row's
    target must be held by exactly one rank. Returns two (N,) tensors, identical on every rank. With
    one process it is the plain per-row gather and logsumexp of the other columns.
    """
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target_and_negative_lse: need logits (N, C) and labels (N,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    return _TargetAndNegativeLSE.apply(logits, labels, group)


def margin_softmax_loss(logits: Tensor, labels: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Mean softmax cross-entropy of margin logits whose columns are split across ranks.

    Equals `F.cross_entropy` on the concatenated columns: -log softmax_y = log(1 + sum_j e^(z_j - z_y))
    = softplus(lse_negatives - z_y), written that way so the two-anchor PCO loss shares the code.
    """
    target, lse_neg = target_and_negative_lse(logits, labels, group)
    return torch.logaddexp(torch.zeros_like(lse_neg), lse_neg - target).mean()


def target_values(values: Tensor, labels: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """values[i, labels[i]] from whichever rank holds row i's target, on every rank; no autograd."""
    with torch.no_grad():
        rows = torch.nonzero(labels >= 0).squeeze(1)
        out = values.new_zeros(values.shape[0])
        out[rows] = values[rows, labels[rows]]
        return all_reduce_sum(out, group)


# --- the module ---------------------------------------------------------------------------------


def full_precision(like: Tensor) -> torch.autocast:
    """Autocast switched off on `like`'s device: logits, margins and softmax of a head run in fp32
    (or fp64) whatever autocast the backbone ran under; bf16/fp16 embeddings are upcast by the head."""
    return torch.autocast(device_type=like.device.type, enabled=False)



@dataclass(frozen=True)
class PartialFCOutput:
    """What a Partial FC (or PCO) head returns for one step.

    Attributes:
        loss: scalar, mean over the global batch, identical on every rank.
        cos_target: (B*W,) cosine of every global-batch sample to its own class centre (no grad);
            identical on every rank. The PCO stage scheduler uses mean(cos_target ** 2).
        num_sampled: centres of this rank used this step (all its centres at sample rate 1).
        stage: PCO stage (1, 2, 3) for a PCO head, None for plain Partial FC.
        sampled_index: (num_sampled,) local rows of the sampled centres, sorted; None if all were used.
    """

    loss: Tensor
    cos_target: Tensor
    num_sampled: int
    stage: int | None = None
    sampled_index: Tensor | None = None

    @property
    def cos_sq_mean(self) -> Tensor:
        """Batch mean of cos^2(feature, own centre), a 0-dim tensor (same on every rank)."""
        return self.cos_target.square().mean()


def _check_positive_int(value: object, name: str, who: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")
    return value


def init_centres(start: int, end: int, feature_dim: int, seed: int = 0, std: float = _INIT_STD) -> Tensor:
    """Rows [start, end) of a (C, D) N(0, std^2) centre matrix that does not depend on the world size.

    Rows are drawn in chunks of 8192, chunk k from a generator seeded by (seed, k), so a shard draws
    only its own chunks and every partition of the rows gives the same matrix.
    """
    out = torch.empty(end - start, feature_dim)
    if end <= start:
        return out
    gen = torch.Generator()
    for chunk in range(start // _INIT_CHUNK_ROWS, (end - 1) // _INIT_CHUNK_ROWS + 1):
        gen.manual_seed((seed * 0x9E3779B97F4A7C15 + chunk) % (1 << 63))
        c0 = chunk * _INIT_CHUNK_ROWS
        block = torch.randn(_INIT_CHUNK_ROWS, feature_dim, generator=gen).mul_(std)  # (8192, D)
        lo, hi = max(start, c0), min(end, c0 + _INIT_CHUNK_ROWS)
        out[lo - start : hi - start] = block[lo - c0 : hi - c0]
    return out


class PartialFC(nn.Module):
    """Margin-softmax classifier head with class centres sharded over the ranks of `group`.

    Args:
        feature_dim: embedding size D.
        num_classes: total number of identities C over all ranks.
        margin: a `Margin` (e.g. `CosFaceMargin()`), applied to fp32 cosine logits.
        sample_rate: fraction of each rank's centres used per step (positives always kept);
            1.0 = full softmax. arcface_torch's ViT recipes use 0.3, the LVFace paper 0.1.
        group: process group (default: the default group, or one process if none exists).
        sparse_update: give the centres a sparse row gradient with only the sampled rows (see the
            module docstring); pair with `torch.optim.SparseAdam`.
        ddp_grad_scaling: multiply the embedding gradient by the world size, for a backbone whose
            gradients DDP/FSDP average across ranks. False gives exactly d loss / d embeddings.
        init_seed: seed of the world-size independent N(0, 0.01^2) centre initialisation.
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        margin: Margin,
        sample_rate: float = 1.0,
        group: dist.ProcessGroup | None = None,
        *,
        sparse_update: bool = False,
        ddp_grad_scaling: bool = True,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.feature_dim = _check_positive_int(feature_dim, "feature_dim", who)
        self.num_classes = _check_positive_int(num_classes, "num_classes", who)
        if not isinstance(margin, Margin):
            raise ValueError(f"{who}: margin must be a lvface_mm.losses Margin (e.g. CosFaceMargin()), got {margin!r}")
        if not isinstance(sample_rate, (int, float)) or isinstance(sample_rate, bool) or not 0.0 <= sample_rate <= 1.0:
            raise ValueError(
                f"{who}: sample_rate must be in [0, 1] (0 = positives only, 1 = all classes), got {sample_rate!r}"
            )
        if not isinstance(init_seed, int) or init_seed < 0:
            raise ValueError(f"{who}: init_seed must be an int >= 0, got {init_seed!r}")
        self.margin = margin
        self.sample_rate = float(sample_rate)
        self.group = group
        self.sparse_update = bool(sparse_update)
        self.ddp_grad_scaling = bool(ddp_grad_scaling)
        self.rank = get_rank(group)
        self.world_size = get_world_size(group)
        self.class_start, class_end = shard_range(self.num_classes, self.rank, self.world_size)
        self.num_local = class_end - self.class_start
        self.weight = nn.Parameter(init_centres(self.class_start, class_end, feature_dim, init_seed))

    def extra_repr(self) -> str:
        return (
            f"feature_dim={self.feature_dim}, num_classes={self.num_classes}, sample_rate={self.sample_rate}, "
            f"rank={self.rank}/{self.world_size}, classes=[{self.class_start}, {self.class_start + self.num_local}), "
            f"sparse_update={self.sparse_update}"
        )

    # -- steps of the forward, shared with PCOHead -------------------------------------------------

    def _gather(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Validate the local batch and return the global (B*W, D) embeddings and (B*W,) labels."""
        who = type(self).__name__
        if get_world_size(self.group) != self.world_size:
            raise RuntimeError(
                f"{who} was built for a world of {self.world_size} process(es) but the process group now has "
                f"{get_world_size(self.group)}; build the head after init_process_group"
            )
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.feature_dim:
            got = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
            raise ValueError(f"{who}: embeddings must be (B, {self.feature_dim}), got {got}")
        if not embeddings.is_floating_point():
            raise ValueError(f"{who}: embeddings must be floating point, got {embeddings.dtype}")
        if not isinstance(labels, Tensor) or labels.shape != (embeddings.shape[0],):
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"{who}: labels must be ({embeddings.shape[0]},) like the embeddings' batch, got {got}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"{who}: labels must be an integer tensor (class ids), got {labels.dtype}")
        if embeddings.device != self.weight.device or labels.device != self.weight.device:
            raise ValueError(
                f"{who}: embeddings ({embeddings.device}) and labels ({labels.device}) must be on the centres' "
                f"device ({self.weight.device}); move the head with .to(device)"
            )
        check_same_batch_size(embeddings.shape[0], embeddings.device, self.group)
        grad_scale = float(self.world_size) if self.ddp_grad_scaling else 1.0
        x = all_gather_with_grad(embeddings, self.group, grad_scale)  # (B*W, D)
        y = all_gather_tensor(labels.long(), self.group)  # (B*W,)
        if y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"{who}: labels must be class ids in [0, {self.num_classes}), got [{lo}, {hi}]")
        return x, y

    def _local_labels(self, labels: Tensor) -> Tensor:
        """Global class ids -> rows of this rank's shard, -1 where another rank owns the class."""
        local = labels - self.class_start
        return local.masked_fill((local < 0) | (local >= self.num_local), -1)

    def _sample(self, local_labels: Tensor, sample_rate: float) -> tuple[Tensor | None, Tensor]:
        """Choose this rank's centres: all positives plus random negatives up to the budget.

        Returns (sorted local row index or None for all rows, labels remapped into that index).
        """
        if sample_rate >= 1.0:
            return None, local_labels
        positives = torch.unique(local_labels[local_labels >= 0])  # sorted
        budget = int(sample_rate * self.num_local)
        if positives.numel() >= budget:
            index = positives
        else:
            # Random scores in [0, 1); positives get 2 so top-k always keeps them.
            score = torch.rand(self.num_local, device=local_labels.device)
            score[positives] = 2.0
            index = score.topk(budget).indices.sort().values
        remapped = torch.searchsorted(index, local_labels.clamp_min(0))
        return index, remapped.masked_fill(local_labels < 0, -1)

    def _centres(self, index: Tensor | None) -> Tensor:
        """The used centre rows, (S, D), differentiable into `self.weight` (sparsely if asked)."""
        if self.sparse_update:
            if index is None:
                index = torch.arange(self.num_local, device=self.weight.device)
            return F.embedding(index, self.weight, sparse=True)
        return self.weight if index is None else self.weight[index]

    @staticmethod
    def _cosine(x_normed: Tensor, rows: Tensor) -> Tensor:
        """Cosine logits (N, S), at least fp32, between normalised features and L2-normalised rows.

        Call it with autocast off (`forward` does): under autocast F.linear would run in bf16/fp16.
        """
        common = torch.promote_types(torch.promote_types(x_normed.dtype, rows.dtype), torch.float32)
        cos = F.linear(x_normed.to(common), F.normalize(rows.to(common), dim=1))
        with torch.no_grad():
            cos.clamp_(-1.0, 1.0)  # rounding can leave |cos| a hair above 1; the gradient is unaffected
        return cos

    def forward(self, embeddings: Tensor, labels: Tensor) -> PartialFCOutput:
        """Loss of the local batch `embeddings` (B, D) with global class ids `labels` (B,)."""
        with full_precision(embeddings):
            return self._forward(embeddings, labels)

    def _forward(self, embeddings: Tensor, labels: Tensor) -> PartialFCOutput:
        x, y = self._gather(embeddings, labels)
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x  # (B*W, D) normalised in fp32
        index, local = self._sample(self._local_labels(y), self.sample_rate)
        cos = self._cosine(F.normalize(x, dim=1), self._centres(index))  # (B*W, S)
        cos_target = target_values(cos, local, self.group)
        loss = margin_softmax_loss(self.margin(cos, local), local, self.group)
        num_sampled = self.num_local if index is None else int(index.numel())
        return PartialFCOutput(loss=loss, cos_target=cos_target, num_sampled=num_sampled, sampled_index=index)

    # -- world-size independent checkpoints -------------------------------------------------------

    def full_state_dict(self) -> dict[str, Tensor]:
        """Full (C, D) centres on every rank, on the CPU. Collective: call it on every rank."""
        return {"weight": gather_rows(self.weight.detach(), self.num_classes, self.group)}

    def load_full_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        """Load a `full_state_dict` saved on any number of ranks: this rank keeps its slice.

        `strict` refuses keys this head does not know (e.g. a PCO bank loaded into plain Partial FC).
        """
        self._check_full_state(state, {"weight"}, strict)
        self._load_rows(self.weight, state["weight"], "weight")

    def local_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(rows, other): this rank's rows [class_start, class_start + num_local) of every row-sharded
        tensor (aliases, no copy, no communication) and the small replicated entries. Together over all
        ranks they are `full_state_dict()`; sharded checkpoints save them without gathering."""
        return {"weight": self.weight.detach()}, {}

    def load_local_state(self, rows: dict[str, Tensor], other: dict[str, Tensor]) -> None:
        """Load this rank's rows (already sliced for its shard) and the replicated entries."""
        self._check_full_state({**rows, **other}, {"weight"}, strict=True)
        self._load_local_rows(self.weight, rows["weight"], "weight")

    def _load_local_rows(self, target: Tensor, rows: Tensor, key: str) -> None:
        shape = (self.num_local, self.feature_dim)
        if not isinstance(rows, Tensor) or tuple(rows.shape) != shape:
            got = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"{type(self).__name__}.load_local_state: {key!r} must be this rank's {shape} rows, "
                             f"got {got}")
        with torch.no_grad():
            target.copy_(rows)

    def _check_full_state(self, state: dict[str, Tensor], expected: set[str], strict: bool) -> None:
        who = type(self).__name__
        if not isinstance(state, dict):
            raise ValueError(f"{who}.load_full_state_dict: expected a dict of tensors, got {type(state).__name__}")
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or (strict and unexpected):
            raise ValueError(
                f"{who}.load_full_state_dict: missing keys {missing}, unexpected keys {unexpected} "
                f"(expected {sorted(expected)}; pass strict=False to ignore unexpected keys)"
            )

    def _load_rows(self, target: Tensor, full: Tensor, key: str) -> None:
        shape = (self.num_classes, self.feature_dim)
        if not isinstance(full, Tensor) or tuple(full.shape) != shape:
            got = tuple(full.shape) if isinstance(full, Tensor) else type(full).__name__
            raise ValueError(
                f"{type(self).__name__}.load_full_state_dict: {key!r} must have shape {shape} "
                f"(num_classes, feature_dim), got {got}"
            )
        with torch.no_grad():
            target.copy_(slice_rows(full, self.group))


__all__ = [
    "PartialFC",
    "full_precision",
    "PartialFCOutput",
    "gather_rows",
    "init_centres",
    "margin_softmax_loss",
    "slice_rows",
    "target_and_negative_lse",
    "target_values",
]
