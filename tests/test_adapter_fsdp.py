"""FSDP2 on CPU (gloo): two processes, each holding half of every weight, train LoRA on a tiny Llama
exactly like one process on the whole batch; and the recipe configs for big VLMs (QLoRA) load."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from tests._losses_fixtures import run_workers
from training.fsdp import FsdpConfig, full_state_dict, layer_classes, shard_model

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def _lora_llama() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA B starts at zero; make both factors matter from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _batch() -> torch.Tensor:
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))  # (B, T)


def _train(model: torch.nn.Module, ids: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _fsdp_worker(rank: int, world: int) -> dict:
    model = _lora_llama()
    names = shard_model(model, FsdpConfig())
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    local_rows = q.to_local().shape[0]  # this process's slice of a frozen base weight
    ids = _batch()[rank * 2 : rank * 2 + 2]  # each process sees half the batch
    _train(model, ids)
    lora = full_state_dict(model, keep=lambda k: "lora_" in k)
    result = {"names": names, "local_rows": local_rows, "full_rows": q.shape[0], "lora": lora}
    del model, q
    gc.collect()
    return result


def test_layer_classes_come_from_the_model() -> None:
    model = _lora_llama()
    assert layer_classes(model, FsdpConfig()) == ("LlamaDecoderLayer",)
    assert layer_classes(model, FsdpConfig(layer_classes=("LlamaMLP",))) == ("LlamaMLP",)
    with pytest.raises(ValueError, match="layer_classes must be class names"):
        FsdpConfig(layer_classes=("",))
    with pytest.raises(RuntimeError, match="needs a process group"):
        shard_model(model)


@pytest.mark.multiproc
def test_two_gloo_processes_shard_and_train_like_one(tmp_path: Path) -> None:
    reference = _lora_llama()
    _train(reference, _batch())
    expected = {k: v for k, v in reference.state_dict().items() if "lora_" in k}

    results = run_workers(_fsdp_worker, 2, tmp_path)
    for r in results:
        assert len(r["names"]) == 2 and all(n.endswith(("layers.0", "layers.1")) for n in r["names"])
        assert r["local_rows"] * 2 == r["full_rows"]  # each process holds half of each weight
        assert r["lora"].keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(r["lora"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # Training moved the adapters (the comparison is not between two untouched copies).
    untouched = {k: v for k, v in _lora_llama().state_dict().items() if "lora_" in k}
    assert any(not torch.allclose(untouched[k], expected[k]) for k in expected)


# -- QLoRA: a 4-bit base on one GPU (the GPU part runs in benchmarks/device/adapter_fsdp_qlora.py) ------
QLORA = ROOT / "training" / "configs" / "adapter" / "llava15_7b_qlora.yaml"


def test_qlora_recipe_loads_and_asks_for_nf4_on_this_process_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from training.adapter import AdapterRunConfig, quantization_kwargs
    from training.config import ConfigError, load_config

    config = load_config(AdapterRunConfig, QLORA, ["--data.path=data/vqa"])
    m = config.model
    assert m.load_in_4bit and m.dtype == "bf16" and m.gradient_checkpointing
    assert config.lora == {
        "r": 64,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "target_modules": config.lora["target_modules"],
    }
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        quantization_kwargs(m, torch.device("cpu"))

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r'needs bitsandbytes: pip install "lvface-mm\[qlora\]"'):
        quantization_kwargs(m, torch.device("cuda", 1))
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    kwargs = quantization_kwargs(m, torch.device("cuda", 1))
    quant = kwargs["quantization_config"]
    assert kwargs["device_map"] == {"": 1}  # the weights are quantised on this process's GPU
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16

    with pytest.raises(ConfigError, match="load_in_4bit computes in bf16"):
        load_config(AdapterRunConfig, QLORA, ["--data.path=data/vqa", "--model.dtype=fp32"])
    assert quantization_kwargs(load_config(AdapterRunConfig, None, ["--data.path=x"]).model, None) == {}
