"""Identity adapter configuration and adapter cards.

An adapter card is an `IdentityAdapterConfig` written as JSON: which VLM (hub id), which family
glue, which LVFace encoder, what the projector reads (the pooled 512-d identity, the 144 patch
tokens, or both), how many identity tokens each face becomes, the placeholder token, and where LoRA
goes. The same JSON sits next to trained adapter weights, so a card and a saved adapter are read by
the same code.

Cards shipped with the repository live in the top-level `adapters/` folder. That folder is data,
not a Python package (AdapterHub's `adapters` owns the name on PyPI); the wheel carries it as
`lvface_mm/adapter_cards/`, and `default_card_dir()` finds either. `tiny-<build>` cards for the
random test models are made in code, not shipped.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..lora import lora_config, lora_kwargs

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig

EmbeddingSource = Literal["pooled", "patch", "both"]
# Where the LLM's LoRA acts: only on prompts with identity tokens, or on every prompt (`lora_scope.py`).
LoraScope = Literal["faces", "all"]
LORA_SCOPES: tuple[str, ...] = ("faces", "all")
EMBEDDING_SOURCES: tuple[str, ...] = ("pooled", "patch", "both")

CONFIG_NAME = "identity_adapter_config.json"
# 2: `lora` is a mapping of peft.LoraConfig arguments; the `tiny` field is gone (tests build tiny models).
# 3: `lora_scope` ("faces": the LoRA acts only on prompts with identity tokens). Version 2 cards and
#    adapters load as "all", the behaviour they were written with.
SCHEMA_VERSION = 3
# Version 1 wrote lora with lvface-mm's own field names; they map one to one onto LoraConfig's.
_V1_LORA_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout", "trainable_tokens": "trainable_token_indices"}

# A placeholder looks like a tag, e.g. "<face>"; "<face_3>" is then reserved for "the face with index 3".
_PLACEHOLDER_RE = re.compile(r"^<([A-Za-z][A-Za-z0-9-]*)>$")


@dataclass(frozen=True)
class IdentityAdapterConfig:
    """Everything needed to rebuild an identity adapter for one VLM.

    Attributes:
        name: short card name, e.g. "llava-1.5-7b".
        vlm_id: Hugging Face hub id or local directory of the VLM/LLM.
        family: VLM family registry key ("llava", "llava_next", "qwen2_vl", "idefics3", "paligemma",
            "causal_lm"); see `lvface_mm.vlm.families.list_families()`.
        encoder: LVFace encoder name from `lvface_mm.list_models()`.
        embedding_source: what the projector reads: "pooled" (the 512-d identity embedding), "patch"
            (the 144 patch tokens) or "both".
        projector: projector registry key ("linear", "mlp2x_gelu", "resampler").
        projector_hidden_dim: hidden width of the projector; None = the LLM's hidden size
            ("resampler": 512).
        num_id_tokens: K, identity tokens per face (one `<face>` in a prompt becomes K copies).
        placeholder_token: the special token added to the tokenizer.
        reference_matching: open-set token mode binds each gallery reference to the picture face it
            matches (`lvface_mm.vlm.matching`: learned face slots and a cosine gate, trained with the
            projector). Needs embedding_source "pooled" or "both".
        region_features: add to each picture face's tokens what is around it in the picture, read
            from the VLM's own vision tower (`lvface_mm.vlm.regions`; families with
            `supports_region_features`: LLaVA-1.5 and PaliGemma), and to the references it matches.
        lora: PEFT's `LoraConfig` for fine-tuning the LLM (a mapping of its arguments is converted),
            or None for projector-only adapters. `target_modules=None` means the family's default
            (the language model's attention projections, never the vision tower);
            `trainable_token_indices` may name tokens as strings (e.g. "<face>"): they become ids
            with the model's tokenizer when LoRA is applied.
        lora_scope: "faces" (default): the LoRA acts only on prompts that carry identity tokens; a
            text-only or face-less prompt runs the base model exactly, row by row within a batch
            (`lvface_mm.vlm.lora_scope`). "all": the LoRA acts on every prompt (plain PEFT).
        description: free text shown by `list_adapter_cards`.
    """

    name: str
    vlm_id: str
    family: str
    encoder: str = "lvface_b"
    embedding_source: EmbeddingSource = "pooled"
    projector: str = "mlp2x_gelu"
    projector_hidden_dim: int | None = None
    num_id_tokens: int = 1
    placeholder_token: str = "<face>"
    reference_matching: bool = False
    region_features: bool = False
    lora: LoraConfig | None = None
    lora_scope: LoraScope = "faces"
    description: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        for name in ("name", "vlm_id", "family", "encoder", "projector"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"IdentityAdapterConfig.{name} must be a non-empty string, got {value!r}")
        if self.embedding_source not in EMBEDDING_SOURCES:
            raise ValueError(
                f"IdentityAdapterConfig.embedding_source must be one of {EMBEDDING_SOURCES}, "
                f"got {self.embedding_source!r}"
            )
        if (
            not isinstance(self.num_id_tokens, int)
            or isinstance(self.num_id_tokens, bool)
            or not 1 <= self.num_id_tokens <= 256
        ):
            raise ValueError(
                f"IdentityAdapterConfig.num_id_tokens must be an int in [1, 256], got {self.num_id_tokens!r}"
            )
        if self.projector_hidden_dim is not None and (
            not isinstance(self.projector_hidden_dim, int) or self.projector_hidden_dim <= 0
        ):
            raise ValueError(
                "IdentityAdapterConfig.projector_hidden_dim must be a positive int or None, "
                f"got {self.projector_hidden_dim!r}"
            )
        if not isinstance(self.placeholder_token, str) or not _PLACEHOLDER_RE.match(self.placeholder_token):
            raise ValueError(
                "IdentityAdapterConfig.placeholder_token must look like a tag without spaces, e.g. '<face>', "
                f"got {self.placeholder_token!r}"
            )
        if not isinstance(self.reference_matching, bool):
            raise ValueError(
                f"IdentityAdapterConfig.reference_matching must be true or false, got {self.reference_matching!r}"
            )
        if self.reference_matching and self.embedding_source == "patch":
            raise ValueError(
                "IdentityAdapterConfig.reference_matching compares pooled identity embeddings: "
                "embedding_source must be 'pooled' or 'both', not 'patch'"
            )
        if not isinstance(self.region_features, bool):
            raise ValueError(
                f"IdentityAdapterConfig.region_features must be true or false, got {self.region_features!r}"
            )
        if self.lora_scope not in LORA_SCOPES:
            raise ValueError(f"IdentityAdapterConfig.lora_scope must be one of {LORA_SCOPES}, got {self.lora_scope!r}")
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"IdentityAdapterConfig.schema_version {self.schema_version!r} is not supported "
                f"(expected {SCHEMA_VERSION})"
            )
        if self.lora is not None:
            object.__setattr__(self, "lora", lora_config(self.lora, "IdentityAdapterConfig.lora"))
            if self.lora_scope == "faces" and self.lora.use_dora:
                raise ValueError(
                    "IdentityAdapterConfig: lora_scope 'faces' switches the LoRA off per prompt, which PEFT "
                    "cannot do for DoRA (lora.use_dora: true); use plain LoRA or lora_scope 'all'"
                )
        self._check_registries()

    def _check_registries(self) -> None:
        # Imported here: the registries import torch/transformers, the dataclass itself does not need them.
        from ..models import list_models
        from .families import list_families
        from .projectors import get_projector_class

        if self.family not in list_families():
            raise ValueError(
                f"IdentityAdapterConfig.family {self.family!r} is unknown; known: {', '.join(list_families())}"
            )
        if self.encoder not in list_models():
            raise ValueError(
                f"IdentityAdapterConfig.encoder {self.encoder!r} is unknown; known: {', '.join(list_models())}"
            )
        projector_cls = get_projector_class(self.projector)
        if self.embedding_source not in projector_cls.supported_sources:
            raise ValueError(
                f"projector {self.projector!r} reads {projector_cls.supported_sources}, "
                f"but embedding_source is {self.embedding_source!r}"
            )

    # -- derived ----------------------------------------------------------------------------------
    @property
    def placeholder_stem(self) -> str:
        """ "face" for "<face>": indexed references are written "<face_0>", "<face_1>", ..."""
        match = _PLACEHOLDER_RE.match(self.placeholder_token)
        assert match is not None  # checked in __post_init__
        return match.group(1)

    # -- JSON round trip -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["lora"] = None if self.lora is None else lora_kwargs(self.lora)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdentityAdapterConfig:
        if not isinstance(data, dict):
            raise ValueError(f"an adapter card must be a JSON object, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys are allowed
        if data.get("schema_version") == 1:
            data = _from_schema_1(data)
        if data.get("schema_version") == 2:
            # Written before lora_scope existed: the LoRA acted on every prompt.
            data = {**data, "lora_scope": data.get("lora_scope", "all"), "schema_version": SCHEMA_VERSION}
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown adapter card field(s) {unknown}; allowed: {sorted(allowed)}")
        if data.get("lora") is not None:
            data = {**data, "lora": lora_config(data["lora"], f"adapter card {data.get('name', '?')!r}: lora")}
        try:
            return cls(**data)
        except TypeError as err:  # a required field is missing
            raise ValueError(f"invalid adapter card: {err}") from err

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        """Write `identity_adapter_config.json` into `save_directory` (created if needed)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> IdentityAdapterConfig:
        """Read a config from a saved adapter directory or from a card/JSON file."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no adapter config at {file}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from err
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> IdentityAdapterConfig:
        return replace(self, **changes)


def _from_schema_1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 card as version 2: LoRA names mapped onto LoraConfig's, no `tiny`."""
    if data.get("tiny") is not None:
        raise ValueError(
            f"adapter card {data.get('name', '?')!r} names tiny build {data['tiny']!r}: cards no longer build test "
            "models; build it with lvface_mm.vlm.testing.build_tiny_vlm and pass the model to "
            "IdentityVLM.from_pretrained(model, processor=..., adapter=card)"
        )
    data = {k: v for k, v in data.items() if k != "tiny"}
    if isinstance(data.get("lora"), dict):
        data["lora"] = {_V1_LORA_NAMES.get(k, k): v for k, v in data["lora"].items()}
    return {**data, "schema_version": 2}


# -- cards ------------------------------------------------------------------------------------------
_EXTRA_CARD_DIRS: list[Path] = []


PACKAGED_CARDS = "adapter_cards"  # the wheel's copy of `adapters/` (pyproject: package-dir mapping)


def default_card_dir() -> Path | None:
    """Where the shipped cards are: `lvface_mm/adapter_cards/` in an installed wheel, the repository's
    `adapters/` folder in a source checkout (or editable install), else None."""
    from importlib.resources import files

    packaged = files("lvface_mm").joinpath(PACKAGED_CARDS)
    if packaged.is_dir():
        return Path(str(packaged))
    # A checkout: the folder sits beside the package. pyproject.toml tells it apart from an unrelated
    # `adapters` package in site-packages (AdapterHub's), which is a sibling there.
    root = Path(__file__).resolve().parents[2]
    candidate = root / "adapters"
    return candidate if candidate.is_dir() and (root / "pyproject.toml").is_file() else None


def add_card_dir(path: str | os.PathLike[str]) -> None:
    """Also look for cards by name in `path` (e.g. a copy of `adapters/` next to an installed package)."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"card directory {directory} does not exist")
    if directory not in _EXTRA_CARD_DIRS:
        _EXTRA_CARD_DIRS.append(directory)


def _card_dirs() -> list[Path]:
    default = default_card_dir()
    return [*_EXTRA_CARD_DIRS, *([default] if default is not None else [])]


def list_adapter_cards() -> list[str]:
    """Names of the cards that `load_adapter_card` finds by name (the shipped cards and added directories).

    Tiny test cards are not among them: `lvface_mm.vlm.testing.tiny_card(build)` makes one."""
    return sorted({p.stem for d in _card_dirs() for p in d.glob("*.json")})


def load_adapter_card(name_or_path: str | os.PathLike[str]) -> IdentityAdapterConfig:
    """Load a card by name ("llava-1.5-7b"), by JSON path, or from a saved adapter directory."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_dir() or path.is_file():
        return IdentityAdapterConfig.from_pretrained(path)
    for directory in _card_dirs():
        candidate = directory / f"{name_or_path}.json"
        if candidate.is_file():
            return IdentityAdapterConfig.from_pretrained(candidate)
    known = list_adapter_cards()
    hint = f"known cards: {', '.join(known)}" if known else "no card directory found; pass a card path"
    raise FileNotFoundError(f"no adapter card named {str(name_or_path)!r}; {hint}")


def find_card_for_model(vlm_id: str) -> IdentityAdapterConfig | None:
    """The first card whose `vlm_id` equals `vlm_id`, or None."""
    for name in list_adapter_cards():
        card = load_adapter_card(name)
        if card.vlm_id == vlm_id:
            return card
    return None


__all__ = [
    "CONFIG_NAME",
    "EMBEDDING_SOURCES",
    "LORA_SCOPES",
    "EmbeddingSource",
    "IdentityAdapterConfig",
    "LoraScope",
    "add_card_dir",
    "default_card_dir",
    "find_card_for_model",
    "list_adapter_cards",
    "load_adapter_card",
]
