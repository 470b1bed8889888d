"""Identity adapters on the Hub, without a network: a real Hugging Face cache folder is laid out in tmp
(blobs, snapshots per commit, refs/main) so `snapshot_download` finds the adapter offline; pinned
revisions, a missing file, the offline message, what `push_to_hub` uploads, the model card, and a
loaded model with its own card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lvface_mm.models.pretrained import WeightsNotAvailableError
from lvface_mm.vlm import IdentityAdapter, IdentityVLM
from lvface_mm.vlm.testing import build_tiny_vlm, random_face_crops, tiny_card, tiny_identity_vlm
from tests._encoder_fixtures import lay_out_hub_cache

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = "someone/tiny-identity"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
BUILD = "causal_lm"  # text-only: the fastest tiny build


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def logits(vlm: IdentityVLM) -> torch.Tensor:
    text = vlm.processor.render_chat([{"role": "user", "content": "<face_1> stands next to <face_0> ."}])
    inputs, tokens = vlm.prepare([text], None, [random_face_crops(2, seed=7)])
    with torch.no_grad():
        return vlm.forward(inputs, tokens).logits


def trained_vlm(seed: int, lora: bool = True) -> IdentityVLM:
    """A tiny VLM with a "trained" projector (and LoRA): anything but the initial weights."""
    vlm = tiny_identity_vlm(BUILD)
    if lora:
        vlm.apply_lora({"r": 4, "lora_alpha": 8})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*vlm.adapter.projector.parameters(), *(p for p in vlm.model.parameters() if p.requires_grad)]:
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return vlm


def publish(cache: Path, folder: Path, commit: str) -> None:
    """Put every file of `folder` into the cache as the snapshot of `commit` (refs/main -> commit)."""
    for file in sorted(folder.iterdir()):
        lay_out_hub_cache(cache, file.name, file, revision=commit, repo_id=REPO)


def test_save_pretrained_writes_a_model_card_and_reloads_by_path(tmp_path: Path) -> None:
    vlm = trained_vlm(seed=1, lora=False)
    folder = vlm.save_pretrained(
        tmp_path / "adapter",
        training_data={"dataset": "runs/vqa_tiny", "train samples": 400},
        evaluation="| mode | accuracy |\n|---|---|\n| token | 0.80 |",
    )
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: lvface-mm/tiny-causal_lm" in card
    assert "library_name: lvface-mm" in card
    for expected in (
        "`lvface_tiny`; weights: none published",  # the encoder and which weights it loads
        "`mlp2x_gelu` reading the `pooled` features",
        "| Identity tokens per face (K) | 2 |",
        "| LLM LoRA | none (projector-only adapter",
        "- train samples: 400",
        "| token | 0.80 |",
    ):
        assert expected in card, expected

    adapter = IdentityAdapter.from_pretrained(folder)  # encoder rebuilt from the card, width from the file
    crops = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(adapter.encode(crops), vlm.adapter.encode(crops), rtol=0, atol=0)
    assert adapter.config == vlm.config


def test_official_encoder_weights_are_named_in_the_card(tmp_path: Path) -> None:
    from lvface_mm.models import get_model_spec
    from lvface_mm.vlm.model_card import render_model_card

    weights = get_model_spec("lvface_b").weights
    text = render_model_card(tiny_card(BUILD, encoder="lvface_b"), has_lora=False)
    assert f"`{weights.repo_id}` file `{weights.filename}` at revision `{weights.revision}`" in text
    assert "Not recorded." in text and "No harness run recorded." in text


def test_hub_repo_id_with_pinned_revision_loads_offline(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    old, new = trained_vlm(seed=1), trained_vlm(seed=2)
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    publish(cache, tmp_path / "old", COMMIT_A)
    publish(cache, tmp_path / "new", COMMIT_B)  # main now points at B

    tiny = build_tiny_vlm(BUILD)
    pinned = IdentityVLM.from_pretrained(
        tiny.model,
        processor=tiny.processor,
        adapter=REPO,
        adapter_revision=COMMIT_A,
        cache_dir=cache,
        encoder_pretrained=False,
    )
    tiny = build_tiny_vlm(BUILD)
    latest = IdentityVLM.from_pretrained(
        tiny.model, processor=tiny.processor, adapter=REPO, cache_dir=cache, encoder_pretrained=False
    )
    # Projector and LoRA both come from the pinned commit.
    torch.testing.assert_close(logits(pinned), logits(old), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(latest), logits(new), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits(pinned), logits(latest))

    adapter = IdentityAdapter.from_pretrained(REPO, revision=COMMIT_A, cache_dir=cache)
    crops = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(adapter.encode(crops), old.adapter.encode(crops), rtol=0, atol=0)


def test_missing_file_and_offline_messages(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    vlm = trained_vlm(seed=1)
    folder = vlm.save_pretrained(tmp_path / "adapter")
    (folder / "adapter_model.safetensors").unlink()  # LoRA config without its weights
    publish(cache, folder, COMMIT_A)
    with pytest.raises(FileNotFoundError, match=rf"{REPO} at revision {COMMIT_A} .*missing adapter_model.safetensors"):
        IdentityAdapter.from_pretrained(REPO, revision=COMMIT_A, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors"):
        IdentityAdapter.from_pretrained(folder)

    with pytest.raises(WeightsNotAvailableError) as info:
        IdentityAdapter.from_pretrained("someone/not-cached", revision="v1", cache_dir=cache)
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message and "hf download someone/not-cached --revision v1" in message
    assert str(cache / "models--someone--not-cached" / "snapshots") in message
    assert not (cache / "models--someone--not-cached" / "snapshots").exists()  # nothing half-written
    assert "No local folder 'someone/not-cached' exists either" in message  # a mistyped folder reads as a repo id

    with pytest.raises(FileNotFoundError, match="neither a saved identity adapter folder nor a Hub repo id"):
        IdentityAdapter.from_pretrained(tmp_path / "nothing" / "here")
    with pytest.raises(ValueError, match="revisions are for repo ids"):
        IdentityAdapter.from_pretrained(tmp_path / "adapter", revision=COMMIT_A)


def test_push_to_hub_uploads_exactly_the_saved_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    calls: dict[str, object] = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["files"] = sorted(p.name for p in folder.iterdir())
        calls["readme"] = (folder / "README.md").read_text()
        calls["upload"] = (repo_id, kwargs)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    vlm = trained_vlm(seed=3)
    assert vlm.push_to_hub(REPO, private=True, revision="dev", training_data="16 synthetic identities") == "commit-info"
    assert calls["files"] == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "identity_adapter.safetensors",
        "identity_adapter_config.json",
        "placeholder_rows.safetensors",
    ]
    assert calls["create"] == (REPO, {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["upload"][0] == REPO and calls["upload"][1]["revision"] == "dev"
    assert f'adapter="{REPO}"' in calls["readme"] and "16 synthetic identities" in calls["readme"]
    assert "PEFT LoRA r=4, alpha=8" in calls["readme"]

    calls.clear()
    vlm.adapter.push_to_hub(REPO)  # the projector alone
    assert calls["files"] == ["README.md", "identity_adapter.safetensors", "identity_adapter_config.json"]


def test_lora_folder_holds_only_what_changed(tmp_path: Path) -> None:
    vlm = trained_vlm(seed=4)
    start, end = vlm.model_changes.rows_added  # the tiny table had no spare row for <face>
    assert end - start == 1
    with torch.no_grad():  # a placeholder row that differs from its mean initialisation
        vlm.model.get_input_embeddings().weight[start:end] += 0.5
    before = logits(vlm)
    folder = vlm.save_pretrained(tmp_path / "adapter")

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)  # no copy of the embedding table or LM head
    hidden = vlm.model.get_input_embeddings().weight.shape[1]
    with safe_open(str(folder / "placeholder_rows.safetensors"), "pt") as f:
        assert sorted(f.keys()) in (["input_rows"], ["input_rows", "output_rows"])
        assert list(f.get_slice("input_rows").get_shape()) == [1, hidden]
    table_bytes = vlm.model.get_input_embeddings().weight.numel() * 4
    assert (folder / "placeholder_rows.safetensors").stat().st_size < table_bytes / 10
    assert "1 row(s) for `<face>`" in (folder / "README.md").read_text()

    again = tiny_identity_vlm(BUILD, adapter=folder)
    torch.testing.assert_close(logits(again), before, rtol=1e-6, atol=1e-6)

    other = build_tiny_vlm(BUILD)
    other.model.resize_token_embeddings(other.model.get_input_embeddings().weight.shape[0] + 3)
    with pytest.raises(ValueError, match="saved for another base model"):
        IdentityVLM.from_pretrained(other.model, processor=other.processor, adapter=folder, encoder_pretrained=False)


def test_a_loaded_model_takes_a_card_and_reports_what_it_changed() -> None:
    tiny = build_tiny_vlm(BUILD)
    tokenizer = tiny.processor
    assert "<face>" not in tokenizer.get_vocab()
    rows = tiny.model.get_input_embeddings().weight.shape[0]
    card = tiny_card(BUILD, num_id_tokens=3, projector="linear", encoder="lvface_tiny")
    vlm = IdentityVLM.from_pretrained(tiny.model, processor=tiny.processor, adapter=card, encoder_pretrained=False)
    assert vlm.config.num_id_tokens == 3 and vlm.config.projector == "linear"  # not K=1/mlp2x_gelu/lvface_b
    assert vlm.encode_faces(random_face_crops(2)).shape[:2] == (2, 3)
    changes = vlm.model_changes
    assert vlm.model is tiny.model  # changed in place, and said so
    assert changes.token_added and "<face>" in tokenizer.get_vocab()
    assert changes.rows_added == (rows, rows + 1) and tiny.model.get_input_embeddings().weight.shape[0] == rows + 1
    assert changes.placeholder_id == tokenizer.convert_tokens_to_ids("<face>")

    with pytest.raises(FileNotFoundError, match="not a saved adapter folder, a Hub repo id"):
        IdentityVLM.from_pretrained(tiny.model, processor=tiny.processor, adapter="no-such-card")
    with pytest.raises(ValueError, match="pass `processor=`"):
        IdentityVLM.from_pretrained(tiny.model, adapter=card)


def test_saved_card_schema_has_no_tiny_field(tmp_path: Path) -> None:
    folder = trained_vlm(seed=5, lora=False).save_pretrained(tmp_path)
    saved = json.loads((folder / "identity_adapter_config.json").read_text())
    assert "tiny" not in saved and saved["schema_version"] == 3 and saved["lora_scope"] == "faces"
