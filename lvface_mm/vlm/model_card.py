"""The README model card written next to a saved identity adapter (what the Hub shows for the repo).

It says what a user needs to load and trust the adapter: the base model, the face encoder and which
weights it was built from, the projector and K, the LLM LoRA, the training data and, when the
adapter was evaluated, the harness table. The YAML header is huggingface_hub's `ModelCardData`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import IdentityAdapterConfig


def encoder_weights_text(encoder: str) -> str:
    """Which weights the named encoder loads: the pinned official file, or none (random init)."""
    from ..models import get_model_spec

    weights = get_model_spec(encoder).weights
    if weights is None:
        return "none published (random initialisation, seeded: tests and demos only)"
    return f"`{weights.repo_id}` file `{weights.filename}` at revision `{weights.revision}`"


def _lora_text(config: IdentityAdapterConfig, has_lora: bool) -> str:
    if not has_lora:
        return "none (projector-only adapter; the LLM is unchanged)"
    lora = config.lora
    if lora is None:
        return "PEFT LoRA (see adapter_config.json)"
    targets = lora.target_modules
    shown = targets if isinstance(targets, str) or targets is None else sorted(targets)
    targets_text = "the family's default" if shown is None else f"`{shown}`"
    return f"PEFT LoRA r={lora.r}, alpha={lora.lora_alpha}, on {targets_text} (adapter_config.json)"


def _data_text(training_data: Mapping[str, Any] | str | None) -> str:
    if training_data is None:
        return "Not recorded."
    if isinstance(training_data, str):
        return training_data.strip()
    return "\n".join(f"- {key}: {value}" for key, value in training_data.items())


def render_model_card(
    config: IdentityAdapterConfig,
    *,
    has_lora: bool,
    added_rows: int = 0,
    training_data: Mapping[str, Any] | str | None = None,
    evaluation: str | None = None,
    repo_id: str | None = None,
) -> str:
    """README.md text for an adapter folder.

    Args:
        config: the adapter card.
        has_lora: the folder holds a PEFT LoRA of the LLM.
        added_rows: embedding rows added to the base model for the placeholder (saved in the folder).
        training_data: a short summary (mapping rendered as a list, or text), or None.
        evaluation: the harness's markdown table, or None.
        repo_id: the Hub repo the card is for (used in the loading example), or None for a folder.
    """
    from huggingface_hub import ModelCardData

    header = ModelCardData(
        library_name="lvface-mm",
        base_model=config.vlm_id,
        tags=["lvface-mm", "identity-adapter", "face-recognition", *(["peft", "lora"] if has_lora else [])],
    ).to_yaml()
    rows_text = (
        f"{added_rows} row(s) for `{config.placeholder_token}`, saved in placeholder_rows.safetensors"
        if added_rows
        else "none (the placeholder fits the existing table)"
    )
    table = [
        "| | |",
        "|---|---|",
        f"| Base model | `{config.vlm_id}` (family `{config.family}`) |",
        f"| Face encoder | `{config.encoder}`; weights: {encoder_weights_text(config.encoder)} |",
        f"| Projector | `{config.projector}` reading the `{config.embedding_source}` features"
        + (f", hidden {config.projector_hidden_dim}" if config.projector_hidden_dim else "")
        + " |",
        f"| Identity tokens per face (K) | {config.num_id_tokens} |",
        f"| Placeholder token | `{config.placeholder_token}` |",
        f"| LLM LoRA | {_lora_text(config, has_lora)} |",
        f"| Added embedding rows | {rows_text} |",
    ]
    source = repo_id or "path/to/this/folder"
    parts = [
        f"---\n{header}\n---",
        f"# Identity adapter `{config.name}`",
        config.description.strip() or "An LVFace identity adapter for a vision-language model.",
        "\n".join(table),
        "## Training data\n\n" + _data_text(training_data),
        "## Evaluation\n\n" + (evaluation.strip() if evaluation else "No harness run recorded."),
        "## Use\n\n```python\nfrom lvface_mm.vlm import IdentityVLM\n\n"
        f'vlm = IdentityVLM.from_pretrained("{config.vlm_id}", adapter="{source}")\n```',
    ]
    return "\n\n".join(parts) + "\n"


__all__ = ["encoder_weights_text", "render_model_card"]
