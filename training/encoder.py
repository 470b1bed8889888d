"""Train an LVFace encoder (PCO or plain Partial FC), or LoRA-tune one, on one or many processes.

    python -m training.encoder --config training/configs/encoder/tiny_synthetic.yaml
    torchrun --nproc_per_node=8 -m training.encoder --config training/configs/encoder/lvface_b_wf42m.yaml
    torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
        --rdzv_endpoint=$HEAD_NODE:29500 -m training.encoder --config ... --output_dir=/shared/runs/b

Overrides: any config field as `--section.key=value` (e.g. `--optim.lr=5e-4 --loop.precision=bf16`).
The run directory gets `config.yaml` (resolved), `log.jsonl`, `tb/`, `checkpoints/` and at the end
`model.pt` (the encoder's flat state dict, loadable with `create_model(name, checkpoint_path=...)`;
LoRA runs also write `adapter/` and merge the adapter into `model.pt`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lvface_mm.data.synthetic import SyntheticFacesConfig
from lvface_mm.distributed import get_rank, is_distributed
from lvface_mm.losses import CosineStageScheduler, PartialFC, PCOHead, create_margin
from lvface_mm.models import create_model, save_pretrained_encoder
from lvface_mm.models.registry import get_model_spec
from lvface_mm.tasks import FaceRecognitionTask, add_lora, merge_adapter, save_adapter, unwrap_encoder
from lvface_mm.tasks.encoder_lora import encoder_lora_config

from .checkpoint import atomic_torch_save
from .config import (
    CheckpointConfig,
    ConfigError,
    LoopConfig,
    OptimConfig,
    _check,  # the sections' shared "raise ValueError(message) unless ok"
    read_yaml,
    save_config,
    to_dict,
)
from .data import open_face_source
from .launch import launcher_precision, process_group, run_program
from .loop import Trainer, build_adamw


# -- run config (the sections shared with every program, optim/loop/checkpoint, live in config.py) ---------
@dataclass(frozen=True)
class ModelConfig:
    """The encoder. Fields left null take the registered model's value (`lvface_mm.models.registry`).

    Args:
        name: registered model name (`lvface_t/s/b/l`, `lvface_tiny`) or an upstream alias.
        pretrained: start from the official weights (downloaded and hash-checked).
        checkpoint_path: start from a local checkpoint instead.
        drop_path_rate, mask_ratio: training regularisers; null = the published recipe's value.
        num_heads: attention heads (tiny CPU runs use fewer, wider heads: CPU attention kernels are
            slow at head width 4).
        grad_checkpointing: recompute block activations in backward (B and L on small GPUs).
    """

    name: str = "lvface_tiny"
    pretrained: bool = False
    checkpoint_path: str | None = None
    drop_path_rate: float | None = None
    mask_ratio: float | None = None
    num_heads: int | None = None
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check(not (self.pretrained and self.checkpoint_path), "give pretrained or checkpoint_path, not both")


@dataclass(frozen=True)
class HeadConfig:
    """The classification head: Partial FC with a margin, or LVFace's PCO head.

    Args:
        kind: "pco" (three stages, LVFace) or "partial_fc" (one stage, arcface_torch).
        margin: "cosface" (the ViT recipes) or "arcface".
        scale, margin_value: logit scale s and margin m (CosFace 64 / 0.4).
        margin_bank: PCO's margin on the feature-expectation logits.
        sample_rate: fraction of each rank's class centres per step (positives always kept).
        delta1, delta2: PCO stage thresholds on the batch mean of cos^2(feature, own centre).
        stage_override_steps: [first step of stage 2, first step of stage 3] instead of thresholds.
        stage_override_epochs: the same by epoch.
        stage_window: the thresholds compare the mean of the last `stage_window` per-step values
            (1 = no smoothing); smooths a noisy cos^2 at small batches.
        min_steps_per_stage: a threshold switch happens only after this many steps in the current
            stage (0 = none). Neither applies to a manual (override) schedule.
        init_seed: seed of the (world-size independent) centre initialisation.
    """

    kind: Literal["pco", "partial_fc"] = "pco"
    margin: Literal["cosface", "arcface"] = "cosface"
    scale: float = 64.0
    margin_value: float = 0.4
    margin_bank: float = 0.4
    sample_rate: float = 0.1
    delta1: float = 0.2
    delta2: float = 0.35
    stage_override_steps: tuple[int | None, int | None] | None = None
    stage_override_epochs: tuple[int | None, int | None] | None = None
    stage_window: int = 1
    min_steps_per_stage: int = 0
    init_seed: int = 0

    def __post_init__(self) -> None:
        _check(0.0 <= self.sample_rate <= 1.0, f"sample_rate must be in [0, 1], got {self.sample_rate}")
        _check(self.scale > 0, f"scale must be > 0, got {self.scale}")
        _check(self.stage_override_steps is None or self.stage_override_epochs is None,
               "give stage_override_steps or stage_override_epochs, not both")
        _check(self.kind == "pco" or (self.stage_override_steps is None and self.stage_override_epochs is None),
               "stage overrides only apply to kind: pco")
        _check(self.stage_window >= 1, f"stage_window must be >= 1 (1 = no smoothing), got {self.stage_window}")
        _check(self.min_steps_per_stage >= 0, f"min_steps_per_stage must be >= 0, got {self.min_steps_per_stage}")
        _check(self.kind == "pco" or (self.stage_window == 1 and self.min_steps_per_stage == 0),
               "stage_window and min_steps_per_stage only apply to kind: pco")


@dataclass(frozen=True)
class DataConfig:
    """Where training images come from. Images must be aligned 112x112 crops.

    Args:
        source: "synthetic" (procedural identities), "recordio" (InsightFace .rec/.idx) or
            "image_folder" (root/<identity>/<image>).
        path: the .rec directory/prefix or the image-folder root (unused for synthetic).
        num_classes: expected number of identities; checked against the data when given.
        batch_size: images per rank per micro-batch (arcface_torch's ViT recipes: 384).
        num_workers: DataLoader worker processes per rank.
        hflip: random horizontal flips, decided per sample from the data seed (reproducible).
        synthetic: the synthetic identity set (source "synthetic").
    """

    source: Literal["synthetic", "recordio", "image_folder"] = "synthetic"
    path: str | None = None
    num_classes: int | None = None
    batch_size: int = 64
    num_workers: int = 2
    hflip: bool = True
    synthetic: SyntheticFacesConfig = field(default_factory=SyntheticFacesConfig)

    def __post_init__(self) -> None:
        _check(self.source == "synthetic" or bool(self.path), f"source {self.source!r} needs data.path")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        _check(self.num_classes is None or self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")


@dataclass(frozen=True)
class EvalConfig:
    """Periodic 1:1 verification (10-fold accuracy with flip, InsightFace protocol) on rank 0.

    Args:
        every_steps: optimizer steps between evaluations (0 = only at the end).
        bin_files: verification `.bin` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).
        synthetic_pairs: also verify on the held-out synthetic identities (source "synthetic").
        batch_size: images per forward pass.
    """

    every_steps: int = 2000
    bin_files: tuple[str, ...] = ()
    synthetic_pairs: bool = True
    batch_size: int = 128

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, f"every_steps must be >= 0, got {self.every_steps}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class EncoderRunConfig:
    """Everything `python -m training.encoder` needs. `lora: {...}` switches to LoRA fine-tuning: its keys
    are `peft.LoraConfig` arguments, read over `lvface_mm.tasks.encoder_lora.ENCODER_LORA_DEFAULTS`."""

    output_dir: str = "runs/encoder"
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.lora is not None:
            encoder_lora_config(self.lora, "lora")  # unknown keys and bad values fail here, not mid-run


# -- verification during training ------------------------------------------------------------------------
@dataclass(frozen=True)
class PairSet:
    """A verification set: 2N aligned crops ((112, 112, 3) uint8 items, pairs interleaved) and N labels."""

    name: str
    images: Sequence[np.ndarray]
    issame: np.ndarray


class VerificationHook:
    """10-fold flip accuracy of the encoder on pair sets, on rank 0, every `every_steps` and at the end."""

    def __init__(self, sets: list[PairSet], every_steps: int, batch_size: int) -> None:
        self.sets = sets
        self.every_steps = every_steps
        self.batch_size = batch_size
        self.best: dict[str, float] = {}

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        from lvface_mm.eval import evaluate_verification, extract_embeddings

        record: dict[str, float] = {}
        if trainer.rank == 0:
            encoder = trainer.task.encoder
            for pair_set in self.sets:
                emb = extract_embeddings(encoder, pair_set.images, batch_size=self.batch_size, flip=True,
                                         progress=False)
                result = evaluate_verification(emb.plain, emb.flipped, pair_set.issame)
                acc = result.flip.mean
                self.best[pair_set.name] = max(self.best.get(pair_set.name, 0.0), acc)
                name = pair_set.name
                record.update({f"{name}/acc": acc, f"{name}/acc_std": result.flip.std,
                               f"{name}/best": self.best[name], f"{name}/xnorm": result.xnorm})
                trainer.logger.message(f"step {trainer.progress.step}: {pair_set.name} accuracy {acc:.4f} "
                                       f"(best {self.best[pair_set.name]:.4f})")
        trainer.task.train()  # restores train mode (and frozen BatchNorm statistics for LoRA)
        if is_distributed():
            dist.barrier()  # the other ranks wait here instead of timing out in the next collective
        return record

    def on_step(self, trainer: Trainer, metrics: dict[str, float]) -> dict[str, float] | None:
        step = trainer.progress.step
        if self.every_steps and step % self.every_steps == 0 and step < trainer.total_steps:
            return self.evaluate(trainer)
        return None

    def on_end(self, trainer: Trainer) -> dict[str, float] | None:
        return self.evaluate(trainer)


def build_pair_sets(config: EncoderRunConfig) -> list[PairSet]:
    """The verification sets of `eval`: `.bin` files and the held-out synthetic identities."""
    from lvface_mm.data import load_verification_bin

    sets = []
    for path in config.eval.bin_files:
        vbin = load_verification_bin(path)
        sets.append(PairSet(vbin.name or Path(path).stem, vbin, vbin.issame))
    if config.eval.synthetic_pairs and config.data.source == "synthetic":
        from lvface_mm.data.synthetic import heldout_pairs

        pairs = heldout_pairs(config.data.synthetic)
        interleaved = torch.stack([pairs.images_a, pairs.images_b], dim=1).flatten(0, 1)  # (2N, 3, 112, 112)
        sets.append(PairSet("synthetic_heldout", interleaved.permute(0, 2, 3, 1).numpy(), pairs.issame.numpy()))
    return sets


# -- building blocks ---------------------------------------------------------------------------------------
def build_encoder(config: EncoderRunConfig) -> nn.Module:
    """The FaceViT of `model` (recipe regularisers unless overridden), LoRA-wrapped if `lora` is set."""
    m = config.model
    spec = get_model_spec(m.name)
    overrides = {
        "drop_path_rate": m.drop_path_rate if m.drop_path_rate is not None else spec.recipe_drop_path_rate,
        "mask_ratio": m.mask_ratio if m.mask_ratio is not None else spec.recipe_mask_ratio,
        "num_heads": m.num_heads,
        "grad_checkpointing": m.grad_checkpointing,
    }
    encoder = create_model(m.name, pretrained=m.pretrained, checkpoint_path=m.checkpoint_path, **overrides)
    if encoder.config.mask_ratio == 0:
        # The mask token is only used by token masking; freezing it keeps DDP from waiting for its gradient.
        encoder.mask_token.requires_grad_(False)
    if config.lora is not None:
        encoder = add_lora(encoder, config.lora)
    return encoder


def build_head(
    config: EncoderRunConfig, feature_dim: int, num_classes: int
) -> tuple[PartialFC, CosineStageScheduler | None]:
    """The Partial FC or PCO head of `head` (and the PCO stage scheduler)."""
    h = config.head
    if h.kind == "partial_fc":
        margin = create_margin(h.margin, scale=h.scale, margin=h.margin_value)
        return PartialFC(feature_dim, num_classes, margin, h.sample_rate, init_seed=h.init_seed), None
    head = PCOHead(feature_dim, num_classes, scale=h.scale, margin=h.margin_value, margin_bank=h.margin_bank,
                   sample_rate=h.sample_rate, margin_type=h.margin, init_seed=h.init_seed)
    overrides = {"override_epochs": h.stage_override_epochs} if h.stage_override_epochs else {}
    scheduler = CosineStageScheduler(h.delta1, h.delta2, h.stage_override_steps, window=h.stage_window,
                                     min_steps_per_stage=h.min_steps_per_stage, **overrides)
    return head, scheduler


def export_encoder(task: FaceRecognitionTask, config: EncoderRunConfig, run_dir: Path) -> Path:
    """Write `model.pt` (flat FaceViT state dict; LoRA merged) and, for LoRA, `adapter/`. Rank 0 only."""
    encoder = task.encoder
    if config.lora is not None:
        save_adapter(encoder, run_dir / "adapter")
        # Merge into a copy: the training task keeps its adapters.
        merged = merge_adapter(_clone(encoder))
        state = merged.state_dict()
    else:
        state = unwrap_encoder(encoder).state_dict()
    path = run_dir / "model.pt"
    atomic_torch_save({k: v.detach().cpu() for k, v in state.items()}, path)
    save_pretrained_encoder(create_model(config.model.name, num_heads=config.model.num_heads, checkpoint_path=path), run_dir / "encoder")  # noqa: E501 - timm/create_model(dir) layout
    return path


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def _write_resolved_config(config: EncoderRunConfig, run_dir: Path) -> None:
    """Save `config.yaml`; an older, different one is kept as `config.<n>.yaml` (nothing is lost)."""
    path = run_dir / "config.yaml"
    if path.is_file() and read_yaml(path) != to_dict(config):
        n = 1
        while (run_dir / f"config.{n}.yaml").exists():
            n += 1
        path.rename(run_dir / f"config.{n}.yaml")
    save_config(config, path)


def train_encoder(config: EncoderRunConfig) -> dict[str, float]:
    """Run one training job; returns the final evaluation metrics (rank 0; empty elsewhere)."""
    run_dir = Path(config.output_dir)
    trainer = None
    with process_group() as device:
        try:
            rank = get_rank()
            if rank == 0:
                _write_resolved_config(config, run_dir)
            data = open_face_source(config.data.source, config.data.path, config.data.synthetic, config.data.hflip)
            if config.data.num_classes is not None and config.data.num_classes != data.num_classes:
                raise ConfigError(f"data.num_classes is {config.data.num_classes} but {config.data.source} data "
                                  f"{config.data.path or ''} has {data.num_classes} identities")
            torch.manual_seed(config.loop.seed)  # identical initial encoder on every rank and world size
            encoder = build_encoder(config)
            head, stage_scheduler = build_head(config, unwrap_encoder(encoder).feature_dim, data.num_classes)
            task = FaceRecognitionTask(encoder, head, stage_scheduler, freeze_norm_stats=config.lora is not None)
            task.to(device)
            no_decay = unwrap_encoder(encoder).no_weight_decay()
            optimizer = build_adamw(task, config.optim, no_decay)
            hook = VerificationHook(build_pair_sets(config), config.eval.every_steps, config.eval.batch_size)
            trainer = Trainer(
                task, optimizer, data, config.data.batch_size, optim=config.optim,
                loop=launcher_precision(config.loop), checkpoint=config.checkpoint, run_dir=run_dir, device=device,
                hooks=[hook] if hook.sets else [], num_workers=config.data.num_workers, with_seeds=True,
                data_seed=config.loop.seed, extra_state={"config": to_dict(config)},
            )
            progress = trainer.fit()
            results: dict[str, float] = {}
            if progress.step >= trainer.total_steps and rank == 0:
                path = export_encoder(task, config, run_dir)
                print(f"encoder weights: {path}", flush=True)
                results = {f"{name}/best": acc for name, acc in hook.best.items()}
            return results
        finally:
            if trainer is not None:
                trainer.close()  # releases the DDP wrapper before the process group ends
            del trainer


def main(argv: list[str] | None = None) -> int:
    status, _ = run_program(EncoderRunConfig, train_encoder, sys.argv[1:] if argv is None else argv, __doc__)
    return status


__all__ = [
    "DataConfig",
    "EncoderRunConfig",
    "EvalConfig",
    "HeadConfig",
    "ModelConfig",
    "PairSet",
    "VerificationHook",
    "build_encoder",
    "build_head",
    "build_pair_sets",
    "export_encoder",
    "main",
    "train_encoder",
]

if __name__ == "__main__":
    sys.exit(main())
