"""One LoRA configuration for the whole library: PEFT's own `LoraConfig`, passed through.

The LLM's LoRA (adapter cards, `training.adapter`), and the LVFace encoder's LoRA (`training.encoder`,
`lvface_mm.tasks.encoder_lora`) are all `peft.LoraConfig` objects. Config files and saved adapter
cards hold them as a plain mapping of `LoraConfig` keyword arguments, written with only the values
that differ from PEFT's defaults, e.g.

    lora: {r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: '.*\\.(q_proj|v_proj)'}

Unknown keys are an error that names the key, the closest `LoraConfig` field and where it came from.
peft is imported only when a LoRA configuration is actually read (it pulls in transformers).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig

# PEFT bookkeeping that a user never writes and that must not travel between models.
# lvface-mm's former LoRA field names (LoraSpec, LLMLoraConfig, EncoderLoraConfig), for the error hint.
_RENAMED = {
    "rank": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "trainable_tokens": "trainable_token_indices",
    "train_embedding_head": "modules_to_save: ['feature']",
}
# Written even at their default values: a reader of a card sees the adapter's size at a glance.
_ALWAYS = ("r", "lora_alpha", "lora_dropout")
_BOOKKEEPING = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision")


def lora_config(value: LoraConfig | Mapping[str, Any], where: str = "lora") -> LoraConfig:
    """A `peft.LoraConfig` from itself or from a mapping of its keyword arguments.

    Args:
        value: a `LoraConfig` (returned as is) or a mapping such as `{"r": 8, "lora_alpha": 16}`.
        where: what the value is, for error messages (e.g. "adapter card foo.json: lora").

    Raises:
        ValueError: not a mapping, an unknown key (with the closest `LoraConfig` field), or a value
            that `LoraConfig` rejects.
    """
    from peft import LoraConfig

    if isinstance(value, LoraConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping of peft.LoraConfig arguments, got {type(value).__name__}")
    allowed = [f.name for f in dataclasses.fields(LoraConfig) if f.init and f.name not in _BOOKKEEPING]
    for key in value:
        if key not in allowed:
            close = _RENAMED.get(key) or next(iter(difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)), None)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ValueError(
                f"{where}: unknown LoRA key {key!r}{hint}; keys are peft.LoraConfig arguments, e.g. "
                "r, lora_alpha, lora_dropout, target_modules, modules_to_save, trainable_token_indices"
            )
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: peft.LoraConfig rejects {dict(value)}: {err}") from err
    _check_numbers(config, where)
    return config


def _check_numbers(config: LoraConfig, where: str) -> None:
    # PEFT accepts r=0 or a negative dropout and fails much later, deep inside a forward pass.
    if not isinstance(config.r, int) or isinstance(config.r, bool) or config.r < 1:
        raise ValueError(f"{where}: r must be an int >= 1, got {config.r!r}")
    if isinstance(config.lora_alpha, bool) or not isinstance(config.lora_alpha, (int, float)) or config.lora_alpha <= 0:
        raise ValueError(f"{where}: lora_alpha must be > 0, got {config.lora_alpha!r}")
    if not isinstance(config.lora_dropout, (int, float)) or not 0.0 <= config.lora_dropout < 1.0:
        raise ValueError(f"{where}: lora_dropout must be in [0, 1), got {config.lora_dropout!r}")


def lora_kwargs(config: LoraConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON/YAML-ready mapping of `config`: only the arguments that differ from PEFT's defaults."""
    from peft import LoraConfig

    config = lora_config(config)
    default = LoraConfig()
    out: dict[str, Any] = {}
    for f in dataclasses.fields(LoraConfig):
        if not f.init or f.name in _BOOKKEEPING:
            continue
        value = getattr(config, f.name)
        if f.name in _ALWAYS or value != getattr(default, f.name):
            out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    # LoraConfig turns target_modules lists into sets; JSON and YAML want lists (sorted: stable files).
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return value


def with_default_targets(config: LoraConfig, targets: str | list[str] | tuple[str, ...]) -> LoraConfig:
    """A copy of `config` with `targets` when it names none (a family's or the encoder's default)."""
    if config.target_modules is not None:
        return config
    return dataclasses.replace(config, target_modules=targets if isinstance(targets, str) else list(targets))


__all__ = ["lora_config", "lora_kwargs", "with_default_targets"]
