"""Identity-adapter training through the one loop: two LLaVA stages on a tiny Llama built from
config, with identity embeddings of synthetic identities.

- stage 1 + 2 learn to name held-out photos of enrolled people far above chance, and the same
  model with an untrained projector stays at chance (so the names come through the identity tokens);
- the saved adapter (projector + PEFT LoRA) loads in a fresh process and gives the same answers;
- checkpoints hold the adapter only; an interrupted stage 2 resumes to the same weights;
- gradient checkpointing really trains LoRA; the encoder-LoRA path adds an identity-preservation
  term and a before/after verification report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lvface_mm.vqa.builder import VQABuildConfig, build_vqa
from lvface_mm.vqa.sources import embedding_cluster_photos, synthetic_photos

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training" / "configs" / "adapter" / "tiny_synthetic.yaml"
NUM_ENROLLED = 12
EVAL_PER_TASK = 30


def _build_naming_set(out: Path) -> None:
    photos = embedding_cluster_photos(NUM_ENROLLED + 4, 6, dim=512, seed=0)
    config = VQABuildConfig(
        num_train_unknown=2,
        num_eval_unknown=2,
        eval_photos_per_identity=2,
        tasks=("naming",),
        train_per_task=400,
        eval_per_task=EVAL_PER_TASK,
        max_faces=2,
    )
    build_vqa(photos, out, config)


def _train(argv: list[str]) -> dict:
    from training.adapter import main

    assert main(["--config", str(CONFIG), "--loop.log_every=50", *argv]) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    data, run = root / "vqa", root / "run"
    _build_naming_set(data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they save on a shared 2-core runner
    try:
        _train(
            [
                f"--data.path={data}",
                f"--output_dir={run}",
                "--stage1.max_steps=30",
                "--stage2.max_steps=200",
                "--eval.modes=[token, plain]",
                f"--eval.max_per_task={EVAL_PER_TASK}",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    return data, run


def test_two_stages_learn_to_name_held_out_photos(trained):
    data, run = trained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["1"]["finished"] and summary["stages"]["2"]["finished"]
    # stage 1 trains the projector only; stage 2 adds LoRA (+ the tiny LLM's output layer)
    assert summary["stages"]["1"]["trainable_parameters"] < summary["stages"]["2"]["trainable_parameters"]
    results = summary["eval"]["results"]
    chance = 1 / NUM_ENROLLED
    token, plain = results["token"]["naming_acc"], results["plain"]["naming_acc"]
    print(f"naming accuracy on held-out photos: token {token:.3f}, plain {plain:.3f}, chance {chance:.3f}")
    assert results["token"]["n_naming"] == EVAL_PER_TASK
    assert token >= 0.5  # measured 0.8-0.9; chance is 0.083
    assert plain <= 3 * chance  # no identity information: at chance


def _untrained_projector_accuracy(run: Path, data: Path) -> float:
    from lvface_mm.vlm.projectors import create_projector
    from lvface_mm.vqa.data import FaceStore
    from lvface_mm.vqa.harness import HarnessConfig, load_trained_vlm, run_modes
    from lvface_mm.vqa.schema import load_samples

    vlm = load_trained_vlm(run / "adapter")
    projector = vlm.adapter.projector
    torch.manual_seed(123)
    fresh = create_projector(vlm.config.projector, projector.spec)
    fresh.calibrate(float(projector.output_norm))
    projector.load_state_dict(fresh.state_dict())
    results, _ = run_modes(
        vlm,
        load_samples(data / "eval.json"),
        FaceStore.open(data, "embedding"),
        HarnessConfig(modes=("token",)),
    )
    return results["token"]["naming_acc"]


def test_untrained_adapter_stays_at_chance(trained):
    data, run = trained
    acc = _untrained_projector_accuracy(run, data)
    print(f"naming accuracy with an untrained projector (trained LoRA): {acc:.3f}, chance {1 / NUM_ENROLLED:.3f}")
    assert acc <= 3 / NUM_ENROLLED


_FRESH = """
import json, sys
from lvface_mm.vqa.data import FaceStore
from lvface_mm.vqa.harness import generate_answers, load_trained_vlm, subsample
from lvface_mm.vqa.schema import load_samples
vlm = load_trained_vlm(sys.argv[1])
samples = subsample(load_samples(sys.argv[2] + "/eval.json"), int(sys.argv[3]))
answers = generate_answers(vlm, samples, FaceStore.open(sys.argv[2], "embedding"))
print("ANSWERS" + json.dumps(answers))
"""


def test_saved_adapter_loads_in_fresh_process_with_same_answers(trained):
    data, run = trained
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "identity_adapter.safetensors").is_file()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, str(adapter), str(data), str(EVAL_PER_TASK)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.split("ANSWERS", 1)[1])
    in_training = json.loads((run / "eval" / "answers.json").read_text())["token"]
    assert fresh == in_training
    # and the PEFT part is PEFT's own format
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["modules_to_save"] == ["lm_head"]


def test_checkpoints_hold_the_adapter_only(trained):
    _, run = trained
    ckpt = torch.load(run / "stage2" / "checkpoints" / "step_00000200.pt", map_location="cpu", weights_only=False)
    keys = list(ckpt["model"]["replicated"])
    assert keys and all(("lora_" in k) or ("modules_to_save" in k) or k.startswith("adapter.projector.") for k in keys)
    assert "adapter.projector.output_norm" in keys  # the calibrated scale travels with the weights
    assert not any("embed_tokens" in k or "encoder" in k or "original_module" in k for k in keys)
    stage1 = torch.load(run / "stage1" / "checkpoints" / "step_00000030.pt", map_location="cpu", weights_only=False)
    assert all(k.startswith("adapter.projector.") for k in stage1["model"]["replicated"])


def _weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {f"p.{k}": v for k, v in load_file(str(adapter_dir / "identity_adapter.safetensors")).items()}
    out.update({f"l.{k}": v for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()})
    return out


def test_interrupted_stage2_resumes_to_the_same_adapter(trained, tmp_path):
    data, _ = trained
    common = [
        f"--data.path={data}",
        "--stage1.max_steps=4",
        "--stage2.max_steps=8",
        "--stage1.batch_size=4",
        "--stage2.batch_size=4",
        "--eval.enabled=false",
        "--checkpoint.every_steps=3",
    ]
    _train([*common, f"--output_dir={tmp_path / 'straight'}"])
    _train([*common, f"--output_dir={tmp_path / 'resumed'}", "--loop.stop_at_step=5"])
    assert (tmp_path / "resumed" / "stage1" / "adapter" / "stage.json").is_file()
    assert not (tmp_path / "resumed" / "stage2" / "adapter").exists()  # stopped inside stage 2
    _train([*common, f"--output_dir={tmp_path / 'resumed'}"])  # stage 1 skipped, stage 2 resumed at step 5
    a, b = _weights(tmp_path / "straight" / "adapter"), _weights(tmp_path / "resumed" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_gradient_checkpointing_trains_lora(trained, tmp_path):
    from lvface_mm.tasks.identity_adapter import IdentityAdapterTask
    from lvface_mm.vqa.schema import load_samples
    from training.adapter import AdapterRunConfig, _dataset, build_vlm, prepare_stage
    from training.config import load_config

    data, _ = trained
    samples = load_samples(data / "train.json")[:8]
    grads = {}
    for checkpointing in (False, True):
        config = load_config(
            AdapterRunConfig,
            CONFIG,
            {"data.path": str(data), "output_dir": str(tmp_path), "model.gradient_checkpointing": str(checkpointing)},
        )
        vlm = build_vlm(config, load_samples(data / "train.json") + load_samples(data / "eval.json"), tmp_path)
        prepare_stage(vlm, config, 2, None)
        task = IdentityAdapterTask(vlm, "embedding").train()
        assert vlm.model.base_model.model.model.gradient_checkpointing is checkpointing
        dataset = _dataset(vlm, config, samples)  # the one prompt format, as training renders it
        batch = {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in dataset[0]}
        task(batch)["loss"].backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in task.named_parameters() if p.requires_grad}
    lora_b = [n for n in grads[True] if "lora_B" in n]
    assert len(lora_b) == 2 * 7  # 2 layers x 7 projections
    for name, g in grads[True].items():
        torch.testing.assert_close(g, grads[False][name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(grads[True][n].abs().sum() > 0 for n in lora_b)  # every LoRA layer is trained


def test_encoder_lora_with_identity_preservation(tmp_path):
    data = tmp_path / "vqa"
    photos = synthetic_photos(data, num_identities=6, photos_per_identity=4, seed=0)
    build_vqa(
        photos,
        data,
        VQABuildConfig(
            num_train_unknown=1,
            num_eval_unknown=1,
            eval_photos_per_identity=2,
            tasks=("naming",),
            train_per_task=16,
            eval_per_task=6,
            max_faces=1,
        ),
    )
    run = tmp_path / "run"
    _train(
        [
            f"--data.path={data}",
            f"--output_dir={run}",
            "--data.face_input=crop",
            "--stages=[2]",
            "--stage2.max_steps=3",
            "--stage2.batch_size=4",
            "--encoder_lora.r=4",
            "--preservation_weight=1.0",
            "--eval.max_per_task=6",
            "--eval.max_new_tokens=4",
        ]
    )
    assert (run / "adapter" / "encoder_lora" / "adapter_config.json").is_file()
    log = [json.loads(line) for line in (run / "stage2" / "log.jsonl").read_text().splitlines()]
    assert any("id_preservation" in r for r in log if r["kind"] == "train")
    report = json.loads((run / "eval" / "report.json").read_text())
    before, after = report["verification"]["before"], report["verification"]["after"]
    assert set(before) == set(after) == {"TAR@FAR=0.01", "TAR@FAR=0.1"}
    assert "Encoder verification" in (run / "eval" / "report.md").read_text()


def test_eval_vqa_command_reports_all_modes(trained, tmp_path):
    from lvface_mm.cli import main

    data, run = trained
    out = tmp_path / "report"
    argv = [
        "eval",
        "vqa",
        "--data",
        str(data),
        "--adapter",
        str(run / "adapter"),
        "--out",
        str(out),
        "--max-per-task",
        "6",
        "--max-new-tokens",
        "8",
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"token", "prompt", "plain"}
    assert all(r["n_naming"] == 6 for r in report["results"].values())
    answers = json.loads((out / "answers.json").read_text())
    # prompt grounding wrote the gallery's names into the prompt; this tiny model was never trained on
    # that wording, so only the answers' existence is checked, not their quality
    assert len(answers["prompt"]) == 6 and (out / "report.png").is_file()
    assert "| metric | token | prompt | plain | text-only | text-only base |" in (out / "report.md").read_text()
    # text-only retention: the built-in general questions, asked of the trained model and of its base
    retention = report["text_retention"]
    assert retention["n_text_qa"] == len(retention["answers"]) >= 30
    assert retention["difference"] == pytest.approx(retention["trained"] - retention["base"])
    assert main([*argv, "--modes", "token,dance"]) == 1  # an unknown mode is a clear error, exit 1


def test_config_errors_name_the_key(tmp_path):
    from training.adapter import main

    with pytest.raises(SystemExit, match="unknown key 'stage2.lrate'"):
        main(["--config", str(CONFIG), f"--output_dir={tmp_path}", "--stage2.lrate=1"])
    with pytest.raises(SystemExit, match="encoder_lora needs data.face_input: crop"):
        main(["--config", str(CONFIG), f"--output_dir={tmp_path}", "--encoder_lora.r=4"])
    with pytest.raises(SystemExit, match="stages must be"):
        main(["--config", str(CONFIG), f"--output_dir={tmp_path}", "--stages=[2, 1]"])
    # the SmolLM2 scenes recipe run without its model_path would silently train a random LLM
    scenes = CONFIG.parent / "smollm2_scenes.yaml"
    with pytest.raises(SystemExit, match="gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf' is read from model.model_path"):
        main(["--config", str(scenes), f"--output_dir={tmp_path}", "--model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf"])
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_final_adapter_has_a_model_card_with_data_and_harness_table(trained):
    _, run = trained
    card = (run / "adapter" / "README.md").read_text()
    assert "base_model:" in card and "| Identity tokens per face (K) | 2 |" in card
    assert "- samples: " in card and "- stage 2: 200 steps" in card
    harness = (run / "eval" / "report.md").read_text().strip().splitlines()[0]
    assert harness in card  # the harness table itself, not a pointer to it
    assert "PEFT LoRA r=16, alpha=32" in card


def test_region_gate_init_opens_the_reader_and_needs_region_features(trained, tmp_path):
    from lvface_mm.vqa.schema import load_samples
    from training.adapter import AdapterRunConfig, build_vlm
    from training.config import load_config

    data, _ = trained
    samples = load_samples(data / "train.json") + load_samples(data / "eval.json")
    common = {"data.path": str(data), "output_dir": str(tmp_path), "model.region_gate_init": "1.0"}
    config = load_config(
        AdapterRunConfig, CONFIG, {**common, "model.card": "tiny-llava", "model.region_features": "true"}
    )
    gate = build_vlm(config, samples, tmp_path).adapter.projector.region_reader.gate
    assert float(gate) == 1.0  # tanh(1.0) = 0.76 of the tokens' norm from the first step
    config = load_config(AdapterRunConfig, CONFIG, common)
    with pytest.raises(ValueError, match=r"model.region_gate_init=1.0 needs region features"):
        build_vlm(config, samples, tmp_path / "llm")
