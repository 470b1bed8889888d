"""Device check for issue 13: `training.adapter` itself, run with the two recipes for 7B VLMs on a 7B-shaped
LLM: the QLoRA recipe (4-bit base, one GPU, the 24 GB claim) and the FSDP recipe (bf16 base sharded
with FSDP2 over an NCCL group). One go on one GPU (H200), a few minutes, no network:

    python benchmarks/device/adapter_fsdp_qlora.py           # 7B shape on cuda:0, one JSON line per part
    python benchmarks/device/adapter_fsdp_qlora.py --quick   # tiny shape on the CPU: checks the script

Setup (weights are random, nothing is downloaded): a synthetic VQA set (`build_vqa`, naming, 512-d
embeddings), a word-level tokenizer for its words, a Llama of LLaMA-2-7B's layer shape (hidden 4096,
32 layers; the vocabulary is the data's words) initialised on the GPU and saved in bf16, and an adapter
card pointing at it. Each part calls `training.adapter.main` in this process with the recipe file and
overrides for the tiny data (card, LoRA targets: the model is a bare Llama, not a LLaVA), stage 2 only,
`--steps` optimizer steps, then reads the run's `log.jsonl` and the peak GPU memory:

  qlora  training/configs/adapter/llava15_7b_qlora.yaml: NF4 base (bitsandbytes), LoRA r 64 on every
         linear layer, gradient checkpointing, adapter-only checkpoint and saved adapter. Exit status 1
         when its peak is not under 24 GiB. --quick: the same file with `model.load_in_4bit=false`
         (bitsandbytes needs CUDA), fp32.
  fsdp   training/configs/adapter/llava15_7b_fsdp.yaml: bf16 base, LoRA r 128, `fsdp.enabled` in a
         1-process NCCL group started here (one GPU cannot show the split itself, which
         tests/test_adapter_fsdp.py checks on 2 gloo processes; this runs the CUDA/NCCL path of the
         program: sharding, no DDP, sharded clipping, gathered checkpoint and adapter, evaluation).
         --quick: gloo. Its peak is the bf16 reference for the QLoRA memory ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
LLAMA_LINEAR = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CONFIGS = ROOT / "training" / "configs" / "adapter"
BUDGET_GIB = 24.0


def write_inputs(root: Path, shape: str, device: torch.device) -> tuple[Path, Path, Path]:
    """(data dir, model dir, card dir): the VQA set, a random Llama for its words, and its adapter card."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lvface_mm.vlm import IdentityAdapterConfig
    from lvface_mm.vqa.builder import VQABuildConfig, build_vqa
    from lvface_mm.vqa.schema import load_samples
    from lvface_mm.vqa.sources import embedding_cluster_photos
    from lvface_mm.vqa.testing import sample_words, tiny_tokenizer_with_words

    data, model_dir, card_dir = root / "vqa", root / "base", root / "card"
    build = VQABuildConfig(tasks=("naming",), train_per_task=256, eval_per_task=8, max_faces=2)
    build_vqa(embedding_cluster_photos(16, 4, dim=512, seed=0), data, build)
    tokenizer = tiny_tokenizer_with_words(sample_words(load_samples(data / "train.json")))
    config = LlamaConfig(
        **SHAPES[shape],
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with device:  # initialise on the GPU: seconds for 7B, where the CPU takes minutes
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    parameters = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    IdentityAdapterConfig(
        name=f"bench-{shape}", vlm_id=str(model_dir), family="causal_lm", encoder="lvface_tiny", num_id_tokens=4
    ).save_pretrained(card_dir)
    print(json.dumps({"part": "setup", "shape": shape, "llm_parameters": parameters}), flush=True)
    return data, model_dir, card_dir


def argv_for(recipe: str, out: Path, data: Path, card: Path, args: argparse.Namespace) -> list[str]:
    argv = [
        "--config", str(CONFIGS / recipe),
        f"--model.card={card}",
        "--model.encoder=lvface_tiny",
        "--model.encoder_pretrained=false",
        f"--lora.target_modules={LLAMA_LINEAR}",
        f"--data.path={data}",
        "--data.num_workers=0",
        f"--output_dir={out}",
        "--stages=[2]",
        f"--stage2.max_steps={args.steps}",
        f"--stage2.batch_size={args.batch_size}",
        "--loop.grad_accum_steps=1",
        "--loop.log_every=1",
        "--loop.progress_bar=false",
        "--loop.tensorboard=false",
        "--eval.modes=[token]",
        "--eval.max_per_task=4",
        "--eval.max_new_tokens=8",
    ]
    if args.quick:
        argv += ["--model.dtype=fp32", "--loop.precision=fp32"]
    return argv


def run_part(name: str, argv: list[str], out: Path, device: torch.device) -> dict[str, Any]:
    """`training.adapter.main(argv)` in this process; what its log and the GPU say."""
    from training.adapter import main

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    status = main(argv)
    wall = time.perf_counter() - start
    gc.collect()
    lines = [json.loads(x) for x in (out / "stage2" / "log.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    gaps = sorted(b["time"] - a["time"] for a, b in zip(train, train[1:]))  # seconds per step after the first
    stage = json.loads((out / "adapter" / "stage.json").read_text())
    result = {
        "part": name,
        "status": status,
        "wall_s": round(wall, 1),
        "steps": stage["steps"],
        "trainable_parameters": stage["trainable_parameters"],
        "fsdp_processes": stage.get("fsdp_processes"),
        "loss_first": round(train[0]["loss"], 4),
        "loss_last": round(train[-1]["loss"], 4),
        "s_per_step_median": round(gaps[len(gaps) // 2], 3) if gaps else None,
        "adapter_files": sorted(p.name for p in (out / "adapter").iterdir()),
        "eval_answers": (out / "eval" / "answers.json").is_file(),
    }
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.empty_cache()
    return result


def fsdp_part(argv: list[str], out: Path, device: torch.device) -> dict[str, Any]:
    """The FSDP recipe in a 1-process group started here (`training.adapter` keeps a caller's group)."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        return run_part("fsdp", argv, out, device)
    finally:
        gc.collect()  # the sharded model's handles go before the group
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape on the CPU (no 4-bit): checks the script")
    parser.add_argument("--steps", type=int, default=4, help="stage-2 optimizer steps per part")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        device, shape = torch.device("cpu"), "tiny"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (use --quick for the CPU check)")
        device, shape = torch.device("cuda", 0), "7b"
        print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}), flush=True)
    ok = True
    with tempfile.TemporaryDirectory(prefix="adapter-7b-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        data, _, card = write_inputs(root, shape, device)
        print(json.dumps({"part": "write", "s": round(time.perf_counter() - start, 1)}), flush=True)

        qlora_argv = argv_for("llava15_7b_qlora.yaml", root / "qlora", data, card, args)
        if args.quick:
            qlora_argv.append("--model.load_in_4bit=false")
        qlora = run_part("qlora", qlora_argv, root / "qlora", device)
        print(json.dumps(qlora), flush=True)

        fsdp_argv = argv_for("llava15_7b_fsdp.yaml", root / "fsdp", data, card, args)
        fsdp = fsdp_part(fsdp_argv, root / "fsdp", device)
        print(json.dumps(fsdp), flush=True)

        ok = qlora["status"] == 0 and fsdp["status"] == 0 and fsdp["fsdp_processes"] == 1
        if "peak_gib" in qlora:
            fits = qlora["peak_gib"] < BUDGET_GIB
            ok = ok and fits
            summary = {
                "qlora_peak_gib": qlora["peak_gib"],
                "budget_gib": BUDGET_GIB,
                "fits": fits,
                "qlora_over_fsdp_bf16_memory": round(qlora["peak_gib"] / fsdp["peak_gib"], 3),
                "note": "qlora: LoRA r 64, fsdp: bf16 base and LoRA r 128 (each recipe as shipped), 1 GPU",
            }
            print(json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
