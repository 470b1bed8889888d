"""timm knows the encoder: FaceViT's `pretrained_cfg` gives timm the right preprocessing, the one
normalisation record is what the pipeline, the dataset reader and training use, and a saved
`model.safetensors` + `config.json` folder loads through `create_model` and timm's `local-dir:`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lvface_mm.faces import to_model_input
from lvface_mm.models import (
    FaceViT,
    FaceViTConfig,
    create_model,
    normalize_crops,
    read_encoder_config,
    register_with_timm,
    save_pretrained_encoder,
)
from lvface_mm.tasks.face_recognition import images_to_input

pytestmark = pytest.mark.usefixtures("single_thread")


def crops_uint8(n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 112, 112), generator=g, dtype=torch.uint8)


# -- preprocessing record ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lvface_tiny", "lvface_b"])
def test_timm_resolves_112_px_and_half_mean_std(name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = create_model(name)
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["input_size"] == (3, 112, 112)
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
    assert model.num_features == 512 and model.pretrained_cfg["architecture"] == name
    # timm's own transform, built from that config, gives what our normaliser gives.
    transform = timm.data.create_transform(**cfg)
    from PIL import Image

    crop = crops_uint8(1)[0]
    image = Image.fromarray(crop.permute(1, 2, 0).numpy())
    torch.testing.assert_close(transform(image), normalize_crops(crop), atol=1e-6, rtol=0)


def test_every_normaliser_reads_the_one_record():
    x = crops_uint8()
    expected = (x.float() - 127.5) / 127.5  # the reference code's formula
    assert torch.equal(normalize_crops(x), expected)  # bit for bit
    assert torch.equal(images_to_input(x), expected)  # training
    assert torch.equal(to_model_input(x.permute(0, 2, 3, 1).numpy()), expected)  # the pipeline
    per_channel = normalize_crops(x, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    torch.testing.assert_close(per_channel[:, 2], (x[:, 2].float() / 255 - 0.6) / 0.3)
    with pytest.raises(TypeError, match="uint8"):
        normalize_crops(x.float())
    with pytest.raises(ValueError, match="channels-first"):
        normalize_crops(x.permute(0, 2, 3, 1))


def test_record_dataset_items_are_normalised_by_the_record(tmp_path):
    from lvface_mm.data.pack import pack_identity_folder
    from lvface_mm.data.record_dataset import RecordDataset
    from tests._datasets_and_eval_fixtures import write_identity_tree

    src = write_identity_tree(tmp_path / "src", identities=1, per_identity=2)
    pack_identity_folder(src, tmp_path / "out", progress=False, workers=1)
    dataset = RecordDataset(tmp_path / "out")
    image, _ = dataset.read_image(0)
    x, _ = dataset[0]
    assert torch.equal(x, normalize_crops(torch.from_numpy(image).permute(2, 0, 1)))


# -- saving and loading -----------------------------------------------------------------------------


@pytest.fixture
def trained_like(tmp_path):
    """A tiny encoder with non-default weights and BN statistics, saved to a folder."""
    torch.manual_seed(3)
    model = create_model("lvface_tiny", num_heads=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    return model, save_pretrained_encoder(model, tmp_path / "encoder")


def test_saved_folder_has_safetensors_and_config(trained_like):
    model, folder = trained_like
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "lvface_tiny" and config["num_features"] == 512 and config["num_classes"] == 0
    assert config["model_args"]["num_heads"] == 2 and config["model_args"]["embed_dim"] == 32
    assert config["pretrained_cfg"]["input_size"] == [3, 112, 112] and config["pretrained_cfg"]["mean"] == [0.5] * 3
    name, cfg = read_encoder_config(folder)
    assert name == "lvface_tiny" and cfg == FaceViTConfig(embed_dim=32, depth=2, num_heads=2, feature_dim=512)


def test_saved_folder_loads_through_create_model_and_timm_with_identical_outputs(trained_like):
    timm = pytest.importorskip("timm")
    register_with_timm()
    model, folder = trained_like
    ours = create_model(folder).eval()
    ours_str = create_model(str(folder)).eval()
    via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert isinstance(via_timm, FaceViT) and via_timm.config == model.config
    x = normalize_crops(crops_uint8(3))
    with torch.no_grad():
        expected = model(x)
        for loaded in (ours, ours_str, via_timm):
            assert torch.equal(loaded(x), expected)
    assert timm.data.resolve_model_data_config(via_timm)["input_size"] == (3, 112, 112)


def test_direct_facevit_is_named_by_its_shape_and_unknown_shapes_need_a_name(tmp_path):
    folder = save_pretrained_encoder(FaceViT(FaceViTConfig(embed_dim=32, depth=2, num_heads=8)), tmp_path / "a")
    assert read_encoder_config(folder)[0] == "lvface_tiny"
    odd = FaceViT(FaceViTConfig(embed_dim=48, depth=1, num_heads=4))
    with pytest.raises(ValueError, match="architecture="):
        save_pretrained_encoder(odd, tmp_path / "b")
    save_pretrained_encoder(odd, tmp_path / "b", architecture="lvface_tiny")  # model_args carry the shape
    assert create_model(tmp_path / "b").config.embed_dim == 48
    with pytest.raises(TypeError, match="FaceViT"):
        save_pretrained_encoder(torch.nn.Linear(2, 2), tmp_path / "c")


def test_broken_folders_are_named(tmp_path, trained_like):
    _, folder = trained_like
    with pytest.raises(ValueError, match="brings its own weights"):
        create_model(folder, checkpoint_path=folder / "model.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        create_model(empty)
    config = json.loads((folder / "config.json").read_text())
    for broken, match in [
        ("{not json", "not valid JSON"),
        (json.dumps({**config, "architecture": "lvface_huge"}), "unknown model 'lvface_huge'"),
        (json.dumps({**config, "model_args": {"width": 3}}), r"unknown model_args \['width'\]"),
        (json.dumps({**config, "model_args": {"embed_dim": 30}}), "divisible"),
    ]:
        (folder / "config.json").write_text(broken)
        with pytest.raises(ValueError, match=match):
            create_model(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        create_model(folder)


def test_registered_names_win_over_folders_of_the_same_name(tmp_path, monkeypatch, trained_like):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lvface_tiny").mkdir()
    assert np.isclose(create_model("lvface_tiny").config.embed_dim, 32)


def test_training_exports_the_folder_next_to_model_pt(tmp_path):
    from pathlib import Path
    from types import SimpleNamespace

    from training.config import load_config
    from training.encoder import EncoderRunConfig, export_encoder

    tiny = Path(__file__).resolve().parents[1] / "training" / "configs" / "encoder" / "tiny_synthetic.yaml"
    config = load_config(EncoderRunConfig, str(tiny), [])
    encoder = create_model("lvface_tiny", num_heads=2).eval()
    export_encoder(SimpleNamespace(encoder=encoder), config, tmp_path)
    assert (tmp_path / "model.pt").is_file()
    loaded = create_model(tmp_path / "encoder").eval()
    x = normalize_crops(crops_uint8(2))
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))
