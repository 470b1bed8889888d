"""LoRA fine-tuning of the encoder: only adapters and the fresh head train; adapters round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from lvface_mm.data.synthetic import SyntheticFaces, SyntheticFacesConfig
from lvface_mm.models import create_model
from lvface_mm.tasks import add_lora, encoder_lora_config, images_to_input, load_adapter, merge_adapter, save_adapter
from training.checkpoint import read_checkpoint
from training.encoder import main

TINY = str(Path(__file__).resolve().parents[1] / "training" / "configs" / "encoder" / "tiny_synthetic.yaml")


# Tiny models: one intra-op thread is as fast as two and keeps the run time predictable.
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lvface_tiny", num_heads=2)


def test_add_lora_trains_only_adapters_and_checks_targets(tmp_path: Path) -> None:
    model = add_lora(tiny_encoder(), {"r": 4})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # 2 blocks x 4 targets (qkv, proj, fc1, fc2) x (A, B)
    assert len(trainable) == 16 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with pytest.raises(ValueError, match=r"LoRA target\(s\) \['attn.qkvv'\] match no Linear layer"):
        add_lora(tiny_encoder(), {"target_modules": ["attn.qkvv"]})
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        encoder_lora_config({"r": 0})
    with pytest.raises(ValueError, match=r"unknown LoRA key 'rank' \(did you mean 'r'\?\)"):
        encoder_lora_config({"rank": 4})
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        load_adapter(tiny_encoder(), tmp_path)
    head = add_lora(tiny_encoder(), LoraConfig(r=4, modules_to_save=["feature"]))  # PEFT's own config
    assert any("feature" in n and "modules_to_save" in n for n, p in head.named_parameters() if p.requires_grad)


def test_lora_run_freezes_the_base_and_round_trips(tmp_path: Path) -> None:
    base_path = tmp_path / "base.pt"
    base = tiny_encoder()
    torch.save(base.state_dict(), base_path)
    main(["--config", TINY, "--loop.progress_bar=false", "--loop.tensorboard=true", "--data.num_workers=0",
          "--eval.synthetic_pairs=false", "--data.synthetic.num_identities=16",
          "--data.synthetic.images_per_identity=8", "--data.batch_size=16", "--loop.max_steps=6",
          "--head.kind=partial_fc", "--head.sample_rate=1.0", f"--model.checkpoint_path={base_path}",
          "--lora.r=4", "--optim.lr=1e-2", f"--output_dir={tmp_path / 'run'}"])

    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tb").iterdir())
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000006")
    optimized = set(ckpt["optimizer"]["state"])
    assert "head.weight" in optimized and all(n == "head.weight" or ".lora_" in n for n in optimized)
    assert len(optimized) == 17  # 16 adapter matrices + the Partial FC centres
    model = ckpt["model"]["replicated"]
    prefix = "encoder.base_model.model."
    for name, value in base.state_dict().items():
        key = prefix + name.replace("attn.qkv.", "attn.qkv.base_layer.").replace("attn.proj.", "attn.proj.base_layer.")
        key = key.replace("mlp.fc1.", "mlp.fc1.base_layer.").replace("mlp.fc2.", "mlp.fc2.base_layer.")
        assert torch.equal(model[key], value), key  # weights and BatchNorm statistics untouched
    assert model[prefix + "blocks.0.attn.qkv.lora_B.default.weight"].abs().sum() > 0  # B starts at 0: it trained

    images = torch.stack([SyntheticFaces(SyntheticFacesConfig(num_identities=4, images_per_identity=2))[i][0]
                          for i in range(8)])
    x = images_to_input(images)
    reloaded = load_adapter(tiny_encoder(), tmp_path / "run" / "adapter").eval()
    merged = create_model("lvface_tiny", num_heads=2, checkpoint_path=tmp_path / "run" / "model.pt").eval()
    with torch.no_grad():
        out_adapter, out_merged, out_base = reloaded(x), merged(x), tiny_encoder().eval()(x)
    torch.testing.assert_close(out_adapter, out_merged, rtol=1e-4, atol=1e-4)
    assert (out_adapter - out_base).abs().max() > 1e-3  # the adapter changes the embedding

    # save_adapter / merge_adapter round trip in memory.
    save_adapter(reloaded, tmp_path / "again")
    twice = load_adapter(tiny_encoder(), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(twice(x), out_adapter)
        torch.testing.assert_close(merge_adapter(twice)(x), out_adapter, rtol=1e-4, atol=1e-4)
