"""Issue 14: adapter training killed in stage 2 before stage 2's first checkpoint restarts stage 2 in a
fresh run; the LoRA initialisation must not depend on whether stage 1 ran in the same process."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.test_adapter_training import _build_naming_set, _train, _weights

pytestmark = pytest.mark.usefixtures("single_thread")


def test_kill_at_stage2_step1_resumes_to_the_same_adapter(tmp_path):
    data = tmp_path / "vqa"
    _build_naming_set(data)
    common = [
        f"--data.path={data}",
        "--stage1.max_steps=3",
        "--stage2.max_steps=4",
        "--stage1.batch_size=4",
        "--stage2.batch_size=4",
        "--eval.enabled=false",
        "--checkpoint.every_steps=100",  # no stage-2 checkpoint before the kill
    ]
    _train([*common, f"--output_dir={tmp_path / 'straight'}"])

    killed = tmp_path / "killed"
    _train([*common, f"--output_dir={killed}", "--stages=[1]"])  # stage 1 finishes ...
    _train([*common, f"--output_dir={killed}", "--loop.stop_at_step=1"])  # ... stage 2 stops after step 1
    # A kill leaves no checkpoint (a graceful stop writes one): remove it, as if the process had died.
    shutil.rmtree(killed / "stage2" / "checkpoints")
    assert not (killed / "stage2" / "adapter").exists() and not list((killed / "stage2").rglob("*.pt"))
    _train([*common, f"--output_dir={killed}"])  # a fresh run: stage 1 skipped, stage 2 from its start

    a, b = _weights(tmp_path / "straight" / "adapter"), _weights(killed / "adapter")
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_lora_sections_are_loraconfig_arguments_with_clear_errors():
    from tests.test_adapter_training import CONFIG
    from training.adapter import AdapterRunConfig
    from training.config import ConfigError, load_config

    config = load_config(AdapterRunConfig, CONFIG, ["--data.path=x", "--encoder_lora.r=4", "--data.face_input=crop"])
    assert config.lora["lora_alpha"] == 32 and config.encoder_lora == {"r": 4}
    with pytest.raises(ConfigError, match=r"lora: unknown LoRA key 'alpha' \(did you mean 'lora_alpha'\?\)"):
        load_config(AdapterRunConfig, CONFIG, ["--data.path=x", "--lora.alpha=8"])
    with pytest.raises(ConfigError, match=r"encoder_lora: r must be an int >= 1"):
        load_config(AdapterRunConfig, CONFIG, ["--data.path=x", "--data.face_input=crop", "--encoder_lora.r=0"])
    with pytest.raises(ConfigError, match=r"model.tiny: .*unexpected keyword argument 'hidden_sise'"):
        load_config(AdapterRunConfig, CONFIG, ["--data.path=x", "--model.tiny.hidden_sise=8"])
