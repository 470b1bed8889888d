"""Loading official-layout checkpoints strictly: the flat `.pt` of all four releases (S/B/L as
meta-tensor files, T for real), wrapped / `module.`-prefixed / safetensors variants, wrong-variant
and damaged files."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from lvface_mm.models import create_model, get_model_spec, guess_variant, load_checkpoint, read_state_dict
from lvface_mm.models.reference import ReferenceFaceViT
from tests._encoder_fixtures import OFFICIAL, official_layout, official_state_dict


@pytest.fixture(scope="module")
def tiny_state() -> OrderedDict[str, torch.Tensor]:
    return official_state_dict(32, 2, seed=3)


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory: pytest.TempPathFactory, tiny_state) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(tiny_state, path)
    return path


def _assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert list(own) == list(state)
    for key, value in state.items():
        assert torch.equal(own[key], value), key


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_model_state_dict_is_the_official_layout(name: str) -> None:
    facts = OFFICIAL[name]
    with torch.device("meta"):
        model = create_model(name)
    layout = official_layout(facts["embed_dim"], facts["depth"])
    own = model.state_dict()
    assert len(own) == len(layout) == facts["keys"]
    assert [(k, tuple(v.shape)) for k, v in own.items()] == layout  # names, order and shapes
    assert own["feature.1.num_batches_tracked"].dtype == torch.int64
    assert own["mask_token"].dtype == torch.float32


@pytest.mark.parametrize("name", ["lvface_s", "lvface_b", "lvface_l"])
def test_large_official_checkpoints_load_strictly_on_meta(name: str, tmp_path: Path) -> None:
    facts = OFFICIAL[name]
    path = tmp_path / f"LVFace-{name[-1].upper()}_Glint360K.pt"
    torch.save(official_state_dict(facts["embed_dim"], facts["depth"], device="meta"), path)
    assert path.stat().st_size < 200_000  # meta tensors carry shapes only
    with torch.device("meta"):
        model = create_model(name, checkpoint_path=path)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == official_layout(
        facts["embed_dim"], facts["depth"]
    )
    assert int(model.state_dict()["feature.3.num_batches_tracked"]) == 12345  # real scalar, not meta


def test_official_t_checkpoint_loads_and_matches_the_reference_forward(tmp_path: Path) -> None:
    state = official_state_dict(256, 12, seed=7)
    path = tmp_path / "LVFace-T_Glint360K.pt"
    torch.save(state, path)
    model = create_model("lvface_t", checkpoint_path=path).eval()
    _assert_loaded(model, state)
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    ref = ReferenceFaceViT(get_model_spec("lvface_t").config)
    ref.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.inference_mode():
        ours, theirs = model(x), ref(x)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_wrapped_prefixed_and_safetensors_checkpoints(tmp_path: Path, tiny_state) -> None:
    from safetensors.torch import save_file

    variants = {
        "module.pt": {f"module.{k}": v for k, v in tiny_state.items()},
        "wrapped.pth": {"state_dict": dict(tiny_state), "epoch": 3, "optimizer": {"lr": 0.1}},
        "model.bin": {"model": {f"backbone.{k}": v for k, v in tiny_state.items()}},
    }
    for filename, obj in variants.items():
        torch.save(obj, tmp_path / filename)
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(tmp_path / "tiny.safetensors"))
    for filename in [*variants, "tiny.safetensors"]:
        _assert_loaded(create_model("lvface_tiny", checkpoint_path=tmp_path / filename), tiny_state)


def test_load_checkpoint_into_an_existing_model_casts_to_its_dtype(tiny_pt: Path, tiny_state) -> None:
    model = create_model("lvface_tiny").to(torch.float64)
    load_checkpoint(model, tiny_pt)
    assert model.pos_embed.dtype == torch.float64
    torch.testing.assert_close(model.pos_embed.float(), tiny_state["pos_embed"])


def test_wrong_variant_names_the_variant_it_looks_like(tmp_path: Path) -> None:
    path = tmp_path / "b.pt"
    torch.save(official_state_dict(512, 24, device="meta"), path)
    assert guess_variant(read_state_dict(path)) == "lvface_b"
    with torch.device("meta"), pytest.raises(ValueError, match=r"does not fit lvface_s.*looks like 'lvface_b'"):
        create_model("lvface_s", checkpoint_path=path)
    torch.save(official_state_dict(256, 12, device="meta"), path)
    with torch.device("meta"), pytest.raises(ValueError, match=r"shape mismatches.*looks like 'lvface_t'"):
        create_model("lvface_l", checkpoint_path=path)


def test_foreign_state_dict_explains_the_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(512, 10)}, path)
    with pytest.raises(ValueError, match=r"resnet.pt does not fit lvface_tiny.*missing keys.*unexpected keys"):
        create_model("lvface_tiny", checkpoint_path=path)


def test_damaged_files_give_clear_errors(tmp_path: Path, tiny_pt: Path, tiny_state) -> None:
    from safetensors.torch import save_file

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_pt.read_bytes()[: tiny_pt.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated.pt: not a readable PyTorch checkpoint, truncated or corrupt"):
        create_model("lvface_tiny", checkpoint_path=truncated)

    st = tmp_path / "cut.safetensors"
    save_file(dict(tiny_state), str(st))
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut.safetensors: not a readable safetensors file"):
        create_model("lvface_tiny", checkpoint_path=st)

    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(ValueError, match=r"empty.pt: the file is empty"):
        create_model("lvface_tiny", checkpoint_path=empty)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(ValueError, match="garbage.pt: not a readable PyTorch checkpoint"):
        read_state_dict(garbage)

    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], not_a_dict)
    with pytest.raises(ValueError, match=r"list.pt: no state dict of tensors found"):
        read_state_dict(not_a_dict)

    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.pt"):
        create_model("lvface_tiny", checkpoint_path=tmp_path / "missing.pt")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_state_dict(tmp_path)
    assert tiny_pt.stat().st_size > 0  # reading never touches the file
