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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lvface_mm.distributed import get_rank, is_distributed
from lvface_mm.losses import CosineStageScheduler, PartialFC, PCOHead, create_margin
from lvface_mm.models import create_model, save_pretrained_encoder
from lvface_mm.models.registry import get_model_spec
from lvface_mm.tasks import FaceRecognitionTask, add_lora, merge_adapter, save_adapter, unwrap_encoder

from .checkpoint import atomic_torch_save
from .config import ConfigError, EncoderRunConfig, read_yaml, save_config, to_dict
from .data import open_face_source
from .launch import launcher_precision, process_group, run_program
from .loop import Trainer, build_adamw


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


__all__ = ["PairSet", "VerificationHook", "build_encoder", "build_head", "build_pair_sets", "export_encoder",
           "main", "train_encoder"]

if __name__ == "__main__":
    sys.exit(main())
