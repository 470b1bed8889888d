"""LoRA that acts only on prompts with identity tokens ("faces" scope).

An identity adapter exists to answer about faces. The bridge already leaves a prompt without faces
exactly as the base model sees it (no placeholder, no injected row), but a LoRA in the language
model changes every prompt: in our runs a LoRA that made SmolLM2-135M name unseen people (0.944 on
the scenes) cost 0.49 of its text-only answers (docs/adapter_training.md, section 5). With the
"faces" scope the LoRA is switched off, row by row, for every prompt that carries no identity token,
so its text-only and no-face answers are the base model's by construction, in training and in use:

    row b has identity tokens -> the LoRA layers compute  W x + B A x
    row b has none            -> the LoRA layers compute  W x          (PEFT's "__base__" rows)

The switch is PEFT's own mixed-batch path (`adapter_names`, one name per row) fed by forward
pre-hooks, so it covers every LoRA layer PEFT knows (also 4-bit ones) and `modules_to_save` copies.
When no row of a batch has faces every PEFT layer runs its base (PEFT's own switch-off, as in
`disable_adapter`). In a mixed batch the language model's layers (decoder and output head) are
switched per row; other layers (a vision tower's, whose rows are pictures or patches, not prompts)
stay on.

Rows repeat under `generate` (beams, `num_return_sequences`): a layer that sees `m` times the batch
repeats each row's choice `m` times, as transformers expands inputs. Merged LoRA weights and DoRA
cannot be switched per row; they are refused by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import LORA_SCOPES, LoraScope

_BASE = "__base__"  # PEFT's name for "no adapter on this row" in mixed batches
# What PEFT's mixed-batch path takes as the original of a `modules_to_save` copy.
_MIXED_BATCH_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _restore(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook: undo a batch-level switch-off made by the pre-hook."""
    was = module.__dict__.pop("_scope_was_disabled", None)
    if was is not None:
        module._disable_adapters = was


def _switchable(module: nn.Module) -> bool:
    """PEFT layers that accept `adapter_names` (LoRA layers and `modules_to_save` wrappers)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover - peft is part of the vlm extra
        return False
    return isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))


def _checkpointing(model: nn.Module) -> bool:
    """Whether the model recomputes activations in backward (transformers 5 renamed the property)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(base), name, None), property):
            return bool(getattr(base, name))
    return False


class FaceScopedLoRA:
    """Switches a model's LoRA off for the rows of a batch that carry no identity token.

    One instance per `IdentityVLM`; hooks are added to the PEFT layers the first time a batch needs
    them (the LoRA may be applied after the `IdentityVLM` is built) and stay, doing nothing while no
    batch is set.
    """

    def __init__(self, scope: LoraScope = "faces") -> None:
        if scope not in LORA_SCOPES:
            raise ValueError(f"lora_scope must be one of {LORA_SCOPES}, got {scope!r}")
        self.scope = scope
        self._rows: list[bool] | None = None  # per prompt row: has identity tokens
        self._hooked: dict[int, tuple[nn.Module, Any, Any]] = {}  # id -> (layer, pre-hook, hook handles)

    def _layers(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        """(language-model layers, other layers) among the model's switchable PEFT layers."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        text_ids: set[int] = set()
        for part in (base.get_decoder(), base.get_output_embeddings()):
            if part is not None:
                text_ids.update(id(m) for m in part.modules())
        text, other = [], []
        for name, module in model.named_modules():
            if not _switchable(module):
                continue
            if getattr(module, "merged", False):
                raise ValueError(
                    f"{name}: LoRA merged into the weights cannot be switched off per prompt; unmerge it "
                    "(model.unmerge_adapter()) or use lora_scope 'all'"
                )
            (text if id(module) in text_ids else other).append(module)
        return text, other

    def _hook(self, model: nn.Module) -> None:
        text, other = self._layers(model)
        for module, per_row in [(m, True) for m in text] + [(m, False) for m in other]:
            if id(module) not in self._hooked:
                self._hooked[id(module)] = (
                    module,
                    module.register_forward_pre_hook(self._pre_hook(per_row), with_kwargs=True),
                    module.register_forward_hook(_restore),
                )

    def _pre_hook(self, per_row: bool) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            rows = self._rows
            if rows is None or all(rows):
                return None
            if not any(rows):  # the whole call runs without this layer's adapter (undone by `_restore`)
                module._scope_was_disabled = module._disable_adapters
                module._disable_adapters = True
                return None
            if not per_row:  # a vision layer: its rows are pictures or patches, not prompts; stays on
                return None
            size = args[0].shape[0] if args and torch.is_tensor(args[0]) else -1
            if size % len(rows):
                raise ValueError(
                    f"lora_scope 'faces': a language-model layer saw {size} rows for a batch of {len(rows)} "
                    "prompts; call the model through IdentityVLM.provide with this batch"
                )
            original = getattr(module, "original_module", None)
            if original is not None and not isinstance(original, _MIXED_BATCH_MODULES):
                raise ValueError(
                    f"lora_scope 'faces': PEFT cannot switch the trained copy of a {type(original).__name__} "
                    "(modules_to_save) per prompt; list Linear/Embedding modules only, or use lora_scope 'all'"
                )
            names = [name for has in rows for name in [self._active(module) if has else _BASE] * (size // len(rows))]
            return args, {**kwargs, "adapter_names": names}

        return hook

    @staticmethod
    def _active(module: nn.Module) -> str:
        active = module.active_adapters if hasattr(module, "active_adapters") else ["default"]
        if len(active) != 1:
            raise ValueError(f"lora_scope 'faces' needs one active adapter, got {list(active)}")
        return active[0]

    @contextlib.contextmanager
    def rows(self, model: nn.Module, has_faces: Sequence[bool]) -> Iterator[None]:
        """Within the block, rows with `has_faces[b]` False run without the LoRA.

        With activation checkpointing the choice stays set after the block, until the next call, so
        that backward's recomputation of the forward sees the same rows.
        """
        flags = [bool(h) for h in has_faces]
        if self.scope == "all" or all(flags):
            self._rows = None
            yield
            return
        self._hook(model)
        self._rows = flags
        try:
            yield
        finally:
            for module, *_ in self._hooked.values():
                _restore(module, (), None)  # a forward that raised midway left a layer switched off
            if not _checkpointing(model):
                self._rows = None

    def close(self) -> None:
        """Remove the hooks."""
        for module, *handles in self._hooked.values():
            _restore(module, (), None)
            for handle in handles:
                handle.remove()
        self._hooked.clear()
        self._rows = None


__all__ = ["FaceScopedLoRA"]
