"""Progressive Cluster Optimization (PCO), the training method of LVFace.

Reference: You et al., "LVFace: Progressive Cluster Optimization for Large Vision Models in Face
Recognition", ICCV 2025 (arXiv 2501.13420). The authors released no training code; this follows
the paper's description (see docs/losses.md for what is inferred).

Three stages, switched by `CosineStageScheduler` when the batch mean of cos^2(feature, own
centre) crosses 0.2 and 0.35:

    1. feature alignment: CosFace (s = 64, m = 0.4) with negative-class sub-sampling (Partial FC);
    2. centroid stabilisation: a per-class feature expectation e_i (running mean of the class's
       normalised features, e_i <- a e_i + (1 - a) x_i with a = sigmoid(cos(x_i, e_i))) becomes a
       second anchor. One softmax-like denominator holds both anchors' terms:

           L = log(1 + sum_{j != y in S} e^(s cos t_j) / e^(s (cos t_y - m1))
                     + sum_{j != y in S} e^(s cos t^e_j) / e^(s (cos t^e_y - m2)))

       with t the angles to the class centres and t^e those to the expectations; still sub-sampled;
    3. boundary refinement: the same loss over all classes, expectation bank frozen.

Choices the paper leaves open, made here:
    - The bank starts as the normalised class centres when stage 2 begins (the scheduler switches
      only once features are aligned with their centres), so every class has an anchor at once.
    - One bank update per class and optimizer step, from the mean of that class's normalised
      features in the global batch; a = sigmoid(cos(batch mean, e_i)). The loss of a step uses the
      bank as it was before that step's update. With gradient accumulation the global batch spans
      several forward calls: with `defer_bank_update=True` each forward only accumulates its
      features and `commit_bank_update()` (called once per optimizer step; `FaceRecognitionTask`
      does) applies them, so 1 process x 2 micro-batches updates the bank exactly as 2 processes
      x 1 micro-batch. The default (False) updates at every forward, i.e. one forward = one step.
    - Bank logits use the same sampled classes as the centre logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import gather_rows, get_rank, get_world_size, shard_range
from .margins import create_margin
from .partial_fc import PartialFC, PartialFCOutput, full_precision, target_and_negative_lse, target_values

STAGES = (1, 2, 3)


class FeatureExpectationBank(nn.Module):
    """Per-class running mean of normalised features, sharded across ranks like the class centres.

    `expectation` is this rank's (num_local, D) slice for classes [class_start, class_start +
    num_local). Updates come from the global (all-gathered) batch, under no_grad, and are skipped
    while `frozen`.
    """

    def __init__(self, num_classes: int, feature_dim: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("feature_dim", feature_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"FeatureExpectationBank: {name} must be a positive int, got {value!r}")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.group = group
        self.class_start, class_end = shard_range(num_classes, get_rank(group), get_world_size(group))
        self.num_local = class_end - self.class_start
        self.frozen = False
        # Accumulated, not yet applied (local rows, normalised features) of the current step; never saved.
        self._pending: list[tuple[Tensor, Tensor]] = []
        self.register_buffer("expectation", torch.zeros(self.num_local, feature_dim))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
            f"classes=[{self.class_start}, {self.class_start + self.num_local}), frozen={self.frozen}"
        )

    @torch.no_grad()
    def initialize_from(self, centres: Tensor) -> None:
        """Start every class's expectation at the direction of its (local) class centre."""
        if tuple(centres.shape) != tuple(self.expectation.shape):
            raise ValueError(
                f"FeatureExpectationBank.initialize_from: centres must be this rank's "
                f"{tuple(self.expectation.shape)} slice, got {tuple(centres.shape)}"
            )
        self.expectation.copy_(F.normalize(centres.detach().to(self.expectation.dtype), dim=1))
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Blend the global batch into the expectations of this rank's classes (accumulate + commit).

        Args:
            features: (N, D) features of the global batch (normalised here).
            labels: (N,) global class ids.
        """
        self.accumulate(features, labels)
        self.commit()

    @torch.no_grad()
    def accumulate(self, features: Tensor, labels: Tensor) -> None:
        """Keep this rank's share of a (micro-)batch for the next `commit`; the expectations do not change."""
        if self.frozen:
            return
        if not bool(self.initialized):
            raise RuntimeError("FeatureExpectationBank.update before initialize_from (or loading a state)")
        if features.dim() != 2 or features.shape[1] != self.feature_dim or labels.shape != (features.shape[0],):
            raise ValueError(
                f"FeatureExpectationBank.update: need features (N, {self.feature_dim}) and labels (N,), got "
                f"{tuple(features.shape)} and {tuple(labels.shape)}"
            )
        local = labels - self.class_start
        mine = (local >= 0) & (local < self.num_local)
        if bool(mine.any()):
            self._pending.append((local[mine], F.normalize(features[mine].to(self.expectation.dtype), dim=1)))

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    @torch.no_grad()
    def commit(self) -> None:
        """One update per class from the mean of everything accumulated since the last commit."""
        pending, self._pending = self._pending, []
        if not pending or self.frozen:
            return
        rows = torch.cat([r for r, _ in pending])  # (n,) local rows, micro-batches in order
        x = torch.cat([f for _, f in pending])  # (n, D) normalised features
        classes, inverse = torch.unique(rows, return_inverse=True)  # (K,), (n,)
        mean = x.new_zeros(classes.numel(), self.feature_dim).index_add_(0, inverse, x)
        mean /= torch.bincount(inverse, minlength=classes.numel()).unsqueeze(1).to(mean.dtype)  # (K, D)
        old = self.expectation[classes]  # (K, D)
        alpha = torch.sigmoid(F.cosine_similarity(mean, old, dim=1)).unsqueeze(1)  # (K, 1)
        self.expectation[classes] = alpha * old + (1.0 - alpha) * mean

    def normalized(self, index: Tensor | None = None) -> Tensor:
        """Unit-length expectations of the local rows `index` (all rows if None), (S, D), no grad."""
        rows = self.expectation if index is None else self.expectation[index]
        return F.normalize(rows, dim=1).detach()


def two_anchor_loss(
    weight_logits: Tensor,
    bank_logits: Tensor,
    labels: Tensor,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """PCO stage 2/3 loss: both anchors' non-target terms in one denominator, mean over rows.

    Args:
        weight_logits: (N, C_local) scaled margin logits against the class centres (s(cos - m1) on
            the target column).
        bank_logits: (N, C_local) scaled margin logits against the feature expectations, same columns.
        labels: (N,) local target column, -1 where another rank holds the target.

    Returns log(1 + sum_neg e^(z_j - z_y) + sum_neg e^(z^e_j - z^e_y)) averaged over rows, with the
    sums running over the columns of all ranks; identical on every rank.
    """
    if weight_logits.shape != bank_logits.shape:
        raise ValueError(
            f"two_anchor_loss: weight_logits {tuple(weight_logits.shape)} and bank_logits "
            f"{tuple(bank_logits.shape)} must cover the same columns"
        )
    target_w, lse_w = target_and_negative_lse(weight_logits, labels, group)
    target_e, lse_e = target_and_negative_lse(bank_logits, labels, group)
    terms = torch.stack([torch.zeros_like(lse_w), lse_w - target_w, lse_e - target_e], dim=1)  # (N, 3)
    return torch.logsumexp(terms, dim=1).mean()


class PCOHead(PartialFC):
    """The PCO classification head: Partial FC in stage 1, two-anchor loss in stages 2 and 3.

    Set `.stage` (usually from `CosineStageScheduler.update`) on every rank at the same step.
    Entering stage 2 initialises the feature-expectation bank from the class centres if it is still
    empty; stage 3 uses all classes and freezes the bank.

    Args:
        feature_dim, num_classes, group, sparse_update, ddp_grad_scaling, init_seed: as `PartialFC`.
        scale: logit scale s. margin: m1 on the centre logits. margin_bank: m2 on the bank logits.
        sample_rate: fraction of each rank's centres used in stages 1 and 2 (the paper: 0.1).
        stage: starting stage (1, 2 or 3).
        margin_type: "cosface" (the paper's choice) or "arcface"; applies to both anchors.
        defer_bank_update: accumulate the bank's features over forward calls until
            `commit_bank_update()` (one optimizer step of several micro-batches); False updates
            the bank at every forward.
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.4,
        margin_bank: float = 0.4,
        sample_rate: float = 0.1,
        stage: int = 1,
        group: dist.ProcessGroup | None = None,
        *,
        margin_type: str = "cosface",
        sparse_update: bool = False,
        ddp_grad_scaling: bool = True,
        init_seed: int = 0,
        defer_bank_update: bool = False,
    ) -> None:
        if margin_type not in ("cosface", "arcface"):
            raise ValueError(f"PCOHead: margin_type must be 'cosface' or 'arcface', got {margin_type!r}")
        super().__init__(
            feature_dim,
            num_classes,
            create_margin(margin_type, scale=scale, margin=margin),
            sample_rate,
            group,
            sparse_update=sparse_update,
            ddp_grad_scaling=ddp_grad_scaling,
            init_seed=init_seed,
        )
        self.margin_bank = create_margin(margin_type, scale=scale, margin=margin_bank)
        self.bank = FeatureExpectationBank(num_classes, feature_dim, group)
        self.defer_bank_update = bool(defer_bank_update)
        self.register_buffer("stage_buffer", torch.tensor(1, dtype=torch.int64))
        self.stage = stage

    @property
    def stage(self) -> int:
        return int(self.stage_buffer)

    @stage.setter
    def stage(self, value: int) -> None:
        if value not in STAGES or isinstance(value, bool):
            raise ValueError(f"PCOHead.stage must be one of {STAGES}, got {value!r}")
        value = int(value)
        if value >= 2 and not bool(self.bank.initialized):
            self.bank.initialize_from(self.weight)
        self.bank.frozen = value == 3
        self.stage_buffer.fill_(value)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stage={self.stage}"

    def forward(self, embeddings: Tensor, labels: Tensor) -> PartialFCOutput:
        with full_precision(embeddings):  # logits, margins and softmax in fp32 under any autocast
            return self._pco_forward(embeddings, labels)

    def _pco_forward(self, embeddings: Tensor, labels: Tensor) -> PartialFCOutput:
        stage = self.stage
        # The stage may also arrive through load_state_dict (the `stage_buffer` buffer), which bypasses
        # the setter: keep the bank's frozen flag in step with it.
        self.bank.frozen = stage == 3
        if stage >= 2 and not bool(self.bank.initialized):
            self.bank.initialize_from(self.weight)
        if stage == 1:
            out = self._forward(embeddings, labels)
            return PartialFCOutput(out.loss, out.cos_target, out.num_sampled, 1, out.sampled_index)
        x, y = self._gather(embeddings, labels)
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x  # (B*W, D)
        index, local = self._sample(self._local_labels(y), self.sample_rate if stage == 2 else 1.0)
        x_normed = F.normalize(x, dim=1)  # (B*W, D)
        cos_w = self._cosine(x_normed, self._centres(index))  # (B*W, S)
        cos_e = self._cosine(x_normed, self.bank.normalized(index).to(x_normed.dtype))  # (B*W, S), gradient to x only
        cos_target = target_values(cos_w, local, self.group)
        loss = two_anchor_loss(self.margin(cos_w, local), self.margin_bank(cos_e, local), local, self.group)
        # After the loss: this step's anchors are the pre-update bank.
        if self.defer_bank_update:
            self.bank.accumulate(x.detach(), y)
        else:
            self.bank.update(x.detach(), y)
        num_sampled = self.num_local if index is None else int(index.numel())
        return PartialFCOutput(loss, cos_target, num_sampled, stage, index)

    def commit_bank_update(self) -> None:
        """Apply the bank features accumulated since the last call (`defer_bank_update=True`): once per
        optimizer step, before the stage can change."""
        self.bank.commit()

    # -- checkpoints ----------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, Tensor]:
        """Centres, bank and stage, full size on every rank (CPU). Collective."""
        state = super().full_state_dict()
        state["bank"] = gather_rows(self.bank.expectation, self.num_classes, self.group)
        state["bank_initialized"] = self.bank.initialized.detach().cpu().clone()
        state["stage"] = torch.tensor(self.stage, dtype=torch.int64)
        return state

    def local_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """This rank's rows of the centres and the bank, plus bank flag and stage (see `PartialFC`)."""
        rows = {"weight": self.weight.detach(), "bank": self.bank.expectation}
        other = {"bank_initialized": self.bank.initialized.detach(), "stage": torch.tensor(self.stage)}
        return rows, other

    def load_local_state(self, rows: dict[str, Tensor], other: dict[str, Tensor]) -> None:
        """Load this rank's rows of centres and bank, and the bank flag and stage."""
        self._check_full_state({**rows, **other}, {"weight", "bank", "bank_initialized", "stage"}, strict=True)
        self._load_local_rows(self.weight, rows["weight"], "weight")
        self._load_local_rows(self.bank.expectation, rows["bank"], "bank")
        self.bank.initialized.fill_(bool(other["bank_initialized"]))
        self.stage = int(other["stage"])

    def load_full_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        """Load a `full_state_dict` saved on any number of ranks (centres, bank, stage)."""
        self._check_full_state(state, {"weight", "bank", "bank_initialized", "stage"}, strict)
        self._load_rows(self.weight, state["weight"], "weight")
        self._load_rows(self.bank.expectation, state["bank"], "bank")
        self.bank.initialized.fill_(bool(state["bank_initialized"]))
        self.stage = int(state["stage"])


__all__ = ["STAGES", "FeatureExpectationBank", "PCOHead", "two_anchor_loss"]
