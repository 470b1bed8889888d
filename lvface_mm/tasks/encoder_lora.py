"""LoRA fine-tuning of a FaceViT encoder with PEFT, for adapting the official weights to a new domain.

Low-rank adapters go on the attention and MLP projections of every block (`attn.qkv`, `attn.proj`,
`mlp.fc1`, `mlp.fc2`); the base weights stay frozen. Paired with a fresh Partial FC head over the
new identities, this trains a few percent of the parameters and saves an adapter of a few MB
(`adapter_model.safetensors` + `adapter_config.json`) that loads on top of the official checkpoint.

The encoder's BatchNorm layers (in the embedding head) should keep the base model's running
statistics while the adapter trains (`FaceRecognitionTask(freeze_norm_stats=True)`): then the base
weights plus the adapter file fully define the fine-tuned model.

Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022; PEFT's
custom-model LoRA (`LoraConfig(target_modules=...)` on any `nn.Module`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class EncoderLoraConfig:
    """Where and how large the adapters are.

    Args:
        rank: LoRA rank r.
        alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module-name suffixes that get adapters (every block's matching Linear).
        train_embedding_head: also train a full copy of the embedding head (`feature`: the
            flatten -> Linear -> BN -> Linear -> BN that makes the 512-d embedding); it is saved
            with the adapter.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    train_embedding_head: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"EncoderLoraConfig.rank must be an int >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"EncoderLoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EncoderLoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"EncoderLoraConfig.target_modules must be non-empty names, got {self.target_modules!r}")


def _check_targets(encoder: nn.Module, targets: tuple[str, ...]) -> None:
    linear = [name for name, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        suffixes = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in linear})
        raise ValueError(f"LoRA target(s) {missing} match no Linear layer of the encoder; Linear layers: {suffixes}")


def add_lora(encoder: nn.Module, config: EncoderLoraConfig) -> nn.Module:
    """Wrap `encoder` in a PEFT LoRA model: only the adapters (and optionally the embedding head) train.

    The encoder is modified in place (PEFT swaps the target Linears for LoRA layers); call it on the
    encoder with its base weights already loaded. Returns the `PeftModel`, which embeds like the
    encoder: `model(x) -> (B, 512)`.
    """
    from peft import LoraConfig, get_peft_model

    _check_targets(encoder, config.target_modules)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        modules_to_save=["feature"] if config.train_embedding_head else None,
        bias="none",
    )
    return get_peft_model(encoder, lora)


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter (and a trained embedding head, if any) to `directory`; returns it."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter needs the model returned by add_lora/load_adapter, got {type(model).__name__}")
    directory = Path(directory)
    model.save_pretrained(str(directory))
    return directory


def load_adapter(encoder: nn.Module, directory: str | Path, trainable: bool = False) -> nn.Module:
    """Put a saved adapter on `encoder` (with the base weights it was trained on). Returns the PeftModel."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no LoRA adapter in {directory} (expected adapter_config.json and adapter weights)")
    return PeftModel.from_pretrained(encoder, str(directory), is_trainable=trainable)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and return the plain encoder (for export and serving)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"merge_adapter needs a PeftModel, got {type(model).__name__}")
    return model.merge_and_unload()


def unwrap_encoder(model: nn.Module) -> nn.Module:
    """The FaceViT inside a PeftModel (adapters still attached), or `model` itself."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


__all__ = [
    "DEFAULT_TARGETS",
    "EncoderLoraConfig",
    "add_lora",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
    "unwrap_encoder",
]
