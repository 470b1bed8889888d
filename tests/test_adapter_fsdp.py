"""FSDP2 on CPU (gloo): two processes, each holding half of every weight, train LoRA on a tiny Llama
exactly like one process on the whole batch; `training.adapter` with `fsdp.enabled` on two processes
trains, checkpoints, resumes, saves and evaluates like one process; and the recipe configs for big
VLMs (FSDP, QLoRA) load.

Every multi-process check reads the one module fixture `fsdp_runs`: spawning gloo processes costs
most of the time here (each child imports torch, transformers and PEFT), so one spawn of two
processes does all the distributed work (the bare sharding, the FSDP run, an interrupted and resumed
FSDP run) and the tests compare what it left behind."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from training.fsdp import full_state_dict, layer_classes, shard_model

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
    names = shard_model(model)
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
    assert layer_classes(model) == ("LlamaDecoderLayer",)
    assert layer_classes(model, ["LlamaMLP"]) == ("LlamaMLP",)
    with pytest.raises(ValueError, match="names no decoder layer class"):
        layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(RuntimeError, match="needs a process group"):
        shard_model(model)


@pytest.mark.multiproc
def test_two_gloo_processes_shard_and_train_like_one(fsdp_runs: dict) -> None:
    reference = _lora_llama()
    _train(reference, _batch())
    expected = {k: v for k, v in reference.state_dict().items() if "lora_" in k}

    for r in fsdp_runs["shard"]:
        assert len(r["names"]) == 2 and all(n.endswith(("layers.0", "layers.1")) for n in r["names"])
        assert r["local_rows"] * 2 == r["full_rows"]  # each process holds half of each weight
        assert r["lora"].keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(r["lora"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # Training moved the adapters (the comparison is not between two untouched copies).
    untouched = {k: v for k, v in _lora_llama().state_dict().items() if "lora_" in k}
    assert any(not torch.allclose(untouched[k], expected[k]) for k in expected)


# -- training.adapter end to end: FSDP on 2 gloo processes == 1 process ------------------------------
ADAPTER = ROOT / "training" / "configs" / "adapter" / "tiny_synthetic.yaml"


def _naming_set(out: Path) -> None:
    from lvface_mm.vqa.builder import VQABuildConfig, build_vqa
    from lvface_mm.vqa.sources import embedding_cluster_photos

    photos = embedding_cluster_photos(8, 4, dim=512, seed=0)
    config = VQABuildConfig(
        num_train_unknown=1,
        num_eval_unknown=1,
        eval_photos_per_identity=1,
        tasks=("naming",),
        train_per_task=64,
        eval_per_task=6,
        max_faces=2,
    )
    build_vqa(photos, out, config)


def _adapter_argv(data: Path, out: Path, batch: int, accum: int, *extra: str) -> list[str]:
    # Global batch 8 either way: 1 process x 4 micro-batches of 2, or 2 processes x 2 micro-batches of 2.
    # The loop gives micro-batch m of rank r chunk m*W + r of the global batch, so both average the
    # same four per-micro-batch losses: the FSDP run must match to rounding.
    return [
        "--config",
        str(ADAPTER),
        f"--data.path={data}",
        f"--output_dir={out}",
        "--stage1.max_steps=3",
        "--stage2.max_steps=4",
        f"--stage1.batch_size={batch}",
        f"--stage2.batch_size={batch}",
        f"--loop.grad_accum_steps={accum}",
        "--loop.log_every=1",
        "--checkpoint.every_steps=2",
        "--eval.modes=[token]",
        "--eval.max_per_task=4",
        "--eval.max_new_tokens=8",  # generation with the sharded model gathers every layer per token
        *extra,
    ]


def _launch(argv: list[str]) -> None:
    from training.adapter import main

    assert main(argv) == 0
    gc.collect()  # the sharded model and its process-group handles go before the group does


def _multiproc_worker(rank: int, world: int, two: list[str], resumed: list[str], root: str) -> dict:
    """Everything distributed, in one spawn: the bare sharding, the FSDP run `two`, then a run that
    starts stage 2 from `two`'s finished stage 1, stops after step 3 and is launched again (a restart
    without the spawn cost: the program joins the group the test started and leaves it running)."""
    import shutil

    import torch.distributed as dist

    out = {"shard": _fsdp_worker(rank, world)}
    _launch(two)
    if rank == 0:
        for done in ("base", "stage1"):  # both runs start stage 2 from the same finished stage 1
            shutil.copytree(Path(root) / "two" / done, Path(root) / "resumed" / done)
    dist.barrier()
    _launch([*resumed, "--loop.stop_at_step=3"])
    out["after_stop"] = sorted(p.name for p in (Path(root) / "resumed" / "stage2" / "checkpoints").glob("*.pt"))
    _launch(resumed)
    return out


def _adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {f"projector/{k}": v for k, v in load_file(str(directory / "identity_adapter.safetensors")).items()}
    lora = directory / "adapter_model.safetensors"
    if lora.is_file():
        out.update({f"lora/{k}": v for k, v in load_file(str(lora)).items()})
    return out


def _losses(run: Path, stage: int) -> list[float]:
    lines = [json.loads(line) for line in (run / f"stage{stage}" / "log.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["kind"] == "train"]


def _run_forked(fn: Callable, world: int, root: Path, *args: object) -> list[dict]:
    """`run_workers` with forked instead of spawned processes: they inherit this process's imports
    (torch, transformers, PEFT: most of a spawned child's time on a busy 2-core machine). Safe for
    the reasons torch's forked DataLoader workers are: each child runs one intra-op thread (`_entry`),
    so it never needs the parent's OpenMP pool; and this process holds no process group to inherit."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from tests._losses_fixtures import _entry, run_workers

    if dist.is_initialized():  # a group left by another test would be inherited: spawn clean processes
        return run_workers(fn, world, root, *args)
    out_dir = root / f"results_{fn.__name__}"
    out_dir.mkdir()
    store = str(root / f"store_{fn.__name__}")
    mp.start_processes(_entry, args=(fn, world, store, str(out_dir), args), nprocs=world, start_method="fork")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`one`: the program on one process; `two`: on two gloo processes with FSDP; `resumed`: the FSDP
    run interrupted in stage 2 and resumed; `shard`: each process's result of `_fsdp_worker`."""
    root = tmp_path_factory.mktemp("adapter_fsdp")
    data = root / "vqa"
    _naming_set(data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker process: the same kernels, the same rounding
    try:
        _launch(_adapter_argv(data, root / "one", 2, 4))
    finally:
        torch.set_num_threads(threads)
    two = _adapter_argv(data, root / "two", 2, 2, "--fsdp.enabled=true")
    resumed = _adapter_argv(data, root / "resumed", 2, 2, "--fsdp.enabled=true", "--eval.enabled=false")
    results = _run_forked(_multiproc_worker, 2, root, two, resumed, str(root))
    return {"root": root, "data": data, "shard": [r["shard"] for r in results], "after_stop": results[0]["after_stop"]}


@pytest.mark.multiproc
def test_adapter_program_with_fsdp_on_two_processes_equals_one_process(fsdp_runs: dict) -> None:
    root = fsdp_runs["root"]
    one, two = root / "one", root / "two"
    info = json.loads((two / "adapter" / "stage.json").read_text())
    assert info["fsdp_processes"] == 2 and info["steps"] == 4
    assert "fsdp_processes" not in json.loads((one / "adapter" / "stage.json").read_text())
    for stage in (1, 2):
        torch.testing.assert_close(_losses(two, stage), _losses(one, stage), rtol=1e-5, atol=1e-6)
    expected, got = _adapter_weights(one / "adapter"), _adapter_weights(two / "adapter")
    assert got.keys() == expected.keys() and any(k.startswith("lora/") for k in got)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # Stage 1 trains the projector alone (FSDP adds the frozen LoRA already, zero at its B side).
    first = _adapter_weights(one / "stage1" / "adapter")
    for key, value in first.items():
        torch.testing.assert_close(_adapter_weights(two / "stage1" / "adapter")[key], value, rtol=1e-4, atol=1e-5)
    # Evaluation ran on both processes through the sharded model and gave one process's answers.
    assert json.loads((two / "eval" / "answers.json").read_text()) == json.loads(
        (one / "eval" / "answers.json").read_text()
    )
    # The checkpoint holds gathered (full-size) adapter tensors only, keyed like an unsharded run's.
    ckpt = torch.load(two / "stage2" / "checkpoints" / "step_00000004.pt", map_location="cpu", weights_only=False)
    ref = torch.load(one / "stage2" / "checkpoints" / "step_00000004.pt", map_location="cpu", weights_only=False)
    assert ckpt["model"]["replicated"].keys() == ref["model"]["replicated"].keys()
    for key, value in ref["model"]["replicated"].items():
        assert ckpt["model"]["replicated"][key].shape == value.shape, key
    assert ckpt["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys()


@pytest.mark.multiproc
def test_fsdp_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(fsdp_runs: dict) -> None:
    root = fsdp_runs["root"]
    resumed = root / "resumed"
    # The first launch stopped inside stage 2 with its step-3 checkpoint (keep_last 1) and no adapter.
    assert fsdp_runs["after_stop"] == ["step_00000003.pt"]
    log = (resumed / "stage2" / "log.jsonl").read_text()
    # One line per step: the second launch continued at step 4 (a fresh start would log 1, 2, 3 again).
    assert [json.loads(line)["step"] for line in log.splitlines() if '"train"' in line] == [1, 2, 3, 4]
    torch.testing.assert_close(_losses(resumed, 2), _losses(root / "two", 2), rtol=0, atol=1e-6)
    expected, got = _adapter_weights(root / "two" / "adapter"), _adapter_weights(resumed / "adapter")
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


def _loss(adapter: Path, data: Path, samples: list) -> float:
    """The training loss of a saved adapter, loaded in this process, on `samples` (one batch)."""
    from torch.utils.data import default_collate

    from lvface_mm.tasks.identity_adapter import IdentityAdapterTask
    from lvface_mm.vqa.data import FaceStore
    from lvface_mm.vqa.harness import load_trained_vlm
    from lvface_mm.vqa.rendering import RenderedDataset, SampleRenderer

    vlm = load_trained_vlm(adapter)
    faces = FaceStore.open(data, "embedding")
    dataset = RenderedDataset(samples, SampleRenderer(vlm, data), faces, pad_id=vlm.processor.tokenizer.pad_token_id)
    task = IdentityAdapterTask(vlm, "embedding").eval()
    with torch.no_grad():
        return float(task(default_collate([dataset[i] for i in range(len(dataset))]))["loss"])


@pytest.mark.multiproc
def test_fsdp_trained_adapter_loads_in_one_process_with_the_same_outputs(fsdp_runs: dict) -> None:
    from lvface_mm.vqa.data import FaceStore
    from lvface_mm.vqa.harness import generate_answers, load_trained_vlm, subsample
    from lvface_mm.vqa.schema import load_samples

    root, data = fsdp_runs["root"], fsdp_runs["data"]
    samples = subsample(load_samples(data / "eval.json"), 4)
    vlm = load_trained_vlm(root / "two" / "adapter")
    answers = generate_answers(vlm, samples, FaceStore.open(data, "embedding"))
    assert answers == json.loads((root / "two" / "eval" / "answers.json").read_text())["token"]
    # The loss the loaded FSDP-trained adapter gives is the one-process adapter's, not stage 1's.
    two, one = _loss(root / "two" / "adapter", data, samples), _loss(root / "one" / "adapter", data, samples)
    stage1 = _loss(root / "two" / "stage1" / "adapter", data, samples)
    assert two == pytest.approx(one, rel=1e-4) and abs(two - stage1) > 1e-3


def test_fsdp_config_is_validated() -> None:
    from training.adapter import AdapterRunConfig
    from training.config import ConfigError, load_config

    config = load_config(AdapterRunConfig, ADAPTER, ["--data.path=x", "--fsdp.enabled=true"])
    assert config.fsdp.enabled and config.fsdp.reshard_after_forward
    recipe = load_config(AdapterRunConfig, ROOT / "training" / "configs" / "adapter" / "llava15_7b_fsdp.yaml")
    plain = load_config(AdapterRunConfig, ROOT / "training" / "configs" / "adapter" / "llava15_7b.yaml")
    assert recipe.fsdp.enabled and "LlamaDecoderLayer" in recipe.fsdp.layer_classes and not plain.fsdp.enabled
    for section in ("model", "lora", "stage1", "stage2"):  # llava15_7b.yaml's recipe, sharded
        assert getattr(recipe, section) == getattr(plain, section), section
    with pytest.raises(ConfigError, match="checkpoint.format must be auto or single_file"):
        load_config(AdapterRunConfig, ADAPTER, ["--data.path=x", "--fsdp.enabled=true", "--checkpoint.format=sharded"])
    with pytest.raises(ConfigError, match="fsdp.enabled with model.load_in_4bit is not supported"):
        load_config(AdapterRunConfig, QLORA, ["--data.path=x", "--fsdp.enabled=true"])
    with pytest.raises(ConfigError, match=r"unknown key 'fsdp.layer_class' \(did you mean 'fsdp.layer_classes'\?\)"):
        load_config(AdapterRunConfig, ADAPTER, ["--data.path=x", "--fsdp.layer_class=LlamaDecoderLayer"])
    with pytest.raises(ConfigError, match=r"command line \(--fsdp.enabled\): fsdp.enabled must be true or false"):
        load_config(AdapterRunConfig, ADAPTER, ["--data.path=x", "--fsdp.enabled=often"])
    with pytest.raises(ConfigError, match=r"invalid 'fsdp': layer_classes\[1\] is empty"):
        load_config(AdapterRunConfig, ADAPTER, ["--data.path=x", "--fsdp.layer_classes=[LlamaDecoderLayer, '']"])


def test_fsdp_in_one_process_stops_before_anything_is_built(tmp_path: Path) -> None:
    from training.adapter import AdapterRunConfig, train_adapter
    from training.config import load_config

    out = tmp_path / "run"
    argv = [f"--data.path={tmp_path}", f"--output_dir={out}", "--fsdp.enabled=true"]
    config = load_config(AdapterRunConfig, ADAPTER, argv)
    with pytest.raises(ValueError, match=r"this run has one: start it with torchrun --nproc_per_node N"):
        train_adapter(config)
    assert not out.exists()


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
