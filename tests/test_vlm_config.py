"""Adapter cards and IdentityAdapterConfig: validation, JSON round trip, card lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig

from lvface_mm.vlm import IdentityAdapterConfig, list_adapter_cards, load_adapter_card
from lvface_mm.vlm.config import add_card_dir, default_card_dir, find_card_for_model
from lvface_mm.vlm.testing import tiny_card

CARD_DIR = Path(__file__).resolve().parents[1] / "adapters"
CARD_FILES = sorted(CARD_DIR.glob("*.json"))

# The models the bridge promises a card for.
REQUIRED_MODELS = {
    "llava-hf/llava-1.5-7b-hf",
    "llava-hf/llava-v1.6-mistral-7b-hf",
    "Qwen/Qwen2-VL-2B-Instruct",
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "HuggingFaceTB/SmolVLM-256M-Instruct",
    "HuggingFaceTB/SmolVLM-Instruct",
    "google/paligemma-3b-mix-224",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
}


@pytest.mark.parametrize("path", CARD_FILES, ids=lambda p: p.stem)
def test_every_card_validates_and_round_trips(path: Path) -> None:
    card = load_adapter_card(path)
    assert card.name == path.stem
    assert IdentityAdapterConfig.from_dict(json.loads(card.to_json_string())) == card


def test_cards_cover_every_supported_model() -> None:
    assert default_card_dir() == CARD_DIR
    cards = [load_adapter_card(name) for name in list_adapter_cards()]
    assert {c.vlm_id for c in cards} >= REQUIRED_MODELS
    # Cards describe models; test models are built by tests (lvface_mm.vlm.testing), never named in a card.
    assert not any("tiny" in json.loads(p.read_text()) for p in CARD_FILES)
    assert find_card_for_model("Qwen/Qwen2-VL-2B-Instruct").family == "qwen2_vl"
    assert find_card_for_model("nobody/nothing") is None


def test_config_save_and_load(tmp_path: Path) -> None:
    card = IdentityAdapterConfig(
        name="x",
        vlm_id="some/model",
        family="llava",
        encoder="lvface_t",
        embedding_source="both",
        projector="resampler",
        projector_hidden_dim=64,
        num_id_tokens=3,
        lora=LoraConfig(
            r=4, target_modules=r".*q_proj", modules_to_save=["lm_head"], trainable_token_indices=["<face>"]
        ),
    )
    path = card.save_pretrained(tmp_path)
    assert path.name == "identity_adapter_config.json"
    # The saved LoRA is a readable mapping of LoraConfig arguments: the set ones, not PEFT's 40 defaults.
    saved = json.loads(path.read_text())
    assert saved["lora"] == {
        "r": 4,
        "target_modules": ".*q_proj",
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "modules_to_save": ["lm_head"],
        "trainable_token_indices": ["<face>"],
    }
    assert "tiny" not in saved and saved["schema_version"] == 3 and saved["lora_scope"] == "faces"
    again = IdentityAdapterConfig.from_pretrained(tmp_path)
    assert isinstance(again.lora, LoraConfig) and again == card and again.lora.modules_to_save == ["lm_head"]
    assert card.placeholder_stem == "face"
    # A mapping is PEFT's LoraConfig once inside the card.
    from_mapping = card.replace(
        lora={
            "r": 4,
            "target_modules": r".*q_proj",
            "modules_to_save": ["lm_head"],
            "trainable_token_indices": ["<face>"],
        }
    )
    assert from_mapping == card


def test_schema_1_cards_are_read_and_tiny_cards_say_what_to_do() -> None:
    old = {
        "name": "x",
        "vlm_id": "m",
        "family": "llava",
        "schema_version": 1,
        "lora": {"r": 4, "alpha": 16, "dropout": 0.1, "trainable_tokens": ["<face>"]},
    }
    card = IdentityAdapterConfig.from_dict(old)
    assert (card.lora.r, card.lora.lora_alpha, card.lora.lora_dropout) == (4, 16, 0.1)
    assert card.lora.trainable_token_indices == ["<face>"] and card.schema_version == 3
    assert card.lora_scope == "all"  # written before the scope existed: the LoRA acted on every prompt
    with pytest.raises(ValueError, match=r"names tiny build 'llava'.*build_tiny_vlm"):
        IdentityAdapterConfig.from_dict({**old, "tiny": "llava"})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"family": "blip2"}, "family 'blip2' is unknown"),
        ({"encoder": "resnet50"}, "encoder 'resnet50' is unknown"),
        ({"projector": "qformer"}, "unknown projector 'qformer'"),
        ({"embedding_source": "cls"}, "embedding_source must be one of"),
        ({"num_id_tokens": 0}, r"num_id_tokens must be an int in \[1, 256\]"),
        ({"placeholder_token": "face"}, "placeholder_token must look like a tag"),
        ({"projector": "resampler", "embedding_source": "pooled"}, "projector 'resampler' reads"),
        ({"schema_version": 4}, "schema_version 4 is not supported"),
        ({"lora_scope": "text"}, "lora_scope must be one of"),
        ({"lora": {"r": 0}}, "r must be an int >= 1"),
        ({"lora": {"lora_dropout": 1.5}}, r"lora_dropout must be in \[0, 1\)"),
    ],
)
def test_bad_config_values_name_the_field(changes: dict, message: str) -> None:
    fields = {"name": "x", "vlm_id": "m", "family": "llava", **changes}
    with pytest.raises(ValueError, match=message):
        IdentityAdapterConfig(**fields)


def test_bad_lora_and_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown adapter card field\(s\) \['num_tokens'\]"):
        IdentityAdapterConfig.from_dict({"name": "x", "vlm_id": "m", "family": "llava", "num_tokens": 2})
    with pytest.raises(ValueError, match=r"adapter card 'x': lora: unknown LoRA key 'rank' \(did you mean 'r'\?\)"):
        IdentityAdapterConfig.from_dict({"name": "x", "vlm_id": "m", "family": "llava", "lora": {"rank": 2}})
    with pytest.raises(ValueError, match="lora must be a mapping of peft.LoraConfig arguments"):
        IdentityAdapterConfig(name="x", vlm_id="m", family="llava", lora=[4])
    with pytest.raises(ValueError, match="invalid adapter card"):
        IdentityAdapterConfig.from_dict({"name": "x"})
    with pytest.raises(FileNotFoundError, match="no adapter card named 'nope'"):
        load_adapter_card("nope")


def test_extra_card_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lvface_mm.vlm.config as config_module

    monkeypatch.setattr(config_module, "_EXTRA_CARD_DIRS", [])  # keep the registration local to this test
    card = tiny_card("llava").replace(name="my-card")
    (tmp_path / "my-card.json").write_text(card.to_json_string())
    add_card_dir(tmp_path)
    assert "my-card" in list_adapter_cards()
    assert load_adapter_card("my-card") == card
