"""Where `IdentityVLM.from_pretrained` finds its parts: the adapter card, a trained adapter's
folder (local or on the Hub), and the base model with its processor and family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .config import CONFIG_NAME, IdentityAdapterConfig, find_card_for_model, list_adapter_cards, load_adapter_card
from .families import VLMFamily, family_for_model, get_family
from .hub import is_repo_id, resolve_adapter


def resolve_card(
    base_model: Any, adapter: Any, hub: dict[str, Any]
) -> tuple[IdentityAdapterConfig | None, Path | None, str | None]:
    """The card, a trained adapter's local folder (or None), and the model id to load (None: given).

    `adapter` wins; else `base_model` may itself name a card or a saved adapter (the model is then
    the card's `vlm_id`); else the card registered for `base_model`'s id (None: a default card is
    made once the model is known).
    """
    card: IdentityAdapterConfig | None
    folder: Path | None = None
    model_id: str | None = None
    if isinstance(base_model, IdentityAdapterConfig):
        card, model_id = base_model, base_model.vlm_id
    elif isinstance(base_model, nn.Module):
        card = None
    else:
        path = Path(base_model)
        if path.is_dir() and (path / CONFIG_NAME).is_file():
            card, folder = card_or_adapter(path, {})
            model_id = card.vlm_id
        elif path.suffix == ".json" or str(base_model) in list_adapter_cards():
            card = load_adapter_card(base_model)
            model_id = card.vlm_id
        else:
            card, model_id = find_card_for_model(str(base_model)), str(base_model)
    if adapter is not None:
        given, folder = card_or_adapter(adapter, hub)
        if (
            card is not None
            and isinstance(base_model, IdentityAdapterConfig)
            and (card.family != given.family or card.vlm_id != given.vlm_id)
        ):
            raise ValueError(f"adapter {adapter} is for {given.vlm_id!r}, not {card.vlm_id!r}")
        card = given
    return card, folder, model_id


def card_or_adapter(value: Any, hub: dict[str, Any]) -> tuple[IdentityAdapterConfig, Path | None]:
    """A card (object, card name, JSON path) for a fresh adapter, or a trained adapter's folder (path or repo id)."""
    if isinstance(value, IdentityAdapterConfig):
        return value, None
    text = str(value)
    path = Path(value)
    if path.suffix == ".json" and path.is_file() or (not path.exists() and text in list_adapter_cards()):
        if hub.get("revision") is not None:
            raise ValueError(f"adapter_revision was given, but {text!r} is an adapter card, not a repo")
        return load_adapter_card(value), None
    if not path.exists() and not is_repo_id(text):
        known = ", ".join(list_adapter_cards()) or "none found"
        raise FileNotFoundError(
            f"adapter {text!r} is not a saved adapter folder, a Hub repo id ('user/name') or an adapter card "
            f"(cards: {known})"
        )
    folder = resolve_adapter(value, **hub)
    return IdentityAdapterConfig.from_pretrained(folder), folder


def load_base_model(
    base_model: Any,
    model_id: str | None,
    card: IdentityAdapterConfig | None,
    processor: Any,
    hub_kwargs: dict[str, Any],
    model_kwargs: dict[str, Any],
) -> tuple[nn.Module, Any, VLMFamily]:
    """The model, its processor and family: given, or loaded with transformers."""
    if model_id is None:
        if processor is None:
            raise ValueError("IdentityVLM.from_pretrained(model): pass `processor=` (the tokenizer for text-only LLMs)")
        return base_model, processor, family_for_model(base_model)
    local_only = hub_kwargs.get("local_files_only")
    family = get_family(card.family) if card is not None else family_of_checkpoint(model_id, hub_kwargs)
    model = family.load_model(model_id, **hub_kwargs, **model_kwargs)
    if processor is None:
        shared = ("gguf_file", "revision", "trust_remote_code")
        proc_kwargs = {k: v for k, v in model_kwargs.items() if k in shared}
        proc_kwargs.update({k: v for k, v in hub_kwargs.items() if k in ("token", "cache_dir")})
        if local_only is not None:
            proc_kwargs["local_files_only"] = local_only
        processor = family.load_processor(model_id, **proc_kwargs)
    return model, processor, family


def family_of_checkpoint(model_id: str, hub_kwargs: dict[str, Any]) -> VLMFamily:
    from transformers import AutoConfig

    from .families import family_for_config

    kwargs = {k: v for k, v in hub_kwargs.items() if k in ("local_files_only", "token", "cache_dir")}
    return family_for_config(AutoConfig.from_pretrained(model_id, **kwargs))


__all__ = ["card_or_adapter", "family_of_checkpoint", "load_base_model", "resolve_card"]
