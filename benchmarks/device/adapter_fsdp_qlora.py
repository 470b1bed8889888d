"""Device check for issue 13: a 7B-shaped LLM trains an identity adapter with QLoRA in under 24 GB, and the
FSDP2 sharding path runs on CUDA. One go on one GPU (H200), about 6 minutes, no network:

    python benchmarks/device/adapter_fsdp_qlora.py           # 7B shape on cuda:0, prints one JSON line per part
    python benchmarks/device/adapter_fsdp_qlora.py --quick   # tiny shape on the CPU, no 4-bit: checks the script

Parts (weights are random, built from a LlamaConfig of LLaMA-2-7B's shape and saved once to a temp dir,
so loading goes through the same `from_pretrained` + `quantization_kwargs` as `training.adapter`):
  qlora  4-bit NF4 base + LoRA r 64 on every linear layer + identity projector, gradient checkpointing,
         batch 4 x 512 tokens, AdamW: peak GPU memory (the 24 GB claim) and seconds per step.
  bf16   the same with a bf16 base: the reference for the memory ratio.
  fsdp   `training.fsdp.shard_model` on the bf16 model in a 1-process NCCL group (one GPU cannot show
         the sharding itself, tested on CPU in tests/test_adapter_fsdp.py; this runs the CUDA/NCCL path).
Exit status 1 when the QLoRA peak is not under 24 GiB.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = {
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}
LORA = {
    "r": 64,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "target_modules": r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
}
BUDGET_GIB = 24.0


def write_random_llm(shape: str, directory: Path, device: torch.device) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with device:  # initialise on the GPU: seconds for 7B, where the CPU takes minutes
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(str(directory))
    del model
    gc.collect()


def identity_vlm(model_dir: Path, device: torch.device, four_bit: bool) -> Any:
    from lvface_mm.vlm import IdentityAdapterConfig, IdentityVLM
    from lvface_mm.vlm.testing import tiny_tokenizer
    from training.adapter import AdapterModelConfig, quantization_kwargs

    dtype = "bf16" if device.type == "cuda" else "fp32"
    m = AdapterModelConfig(card="unused", dtype=dtype, load_in_4bit=four_bit)
    kwargs = quantization_kwargs(m, device) if four_bit else {"device_map": {"": device}}
    card = IdentityAdapterConfig(
        name="bench", vlm_id=str(model_dir), family="causal_lm", encoder="lvface_tiny", num_id_tokens=4
    )
    return IdentityVLM.from_pretrained(
        str(model_dir),
        adapter=card,
        processor=tiny_tokenizer(),
        dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
        encoder_pretrained=False,
        **kwargs,
    )


def make_trainable(vlm: Any, four_bit: bool) -> list[torch.nn.Parameter]:
    """What `training.adapter.prepare_stage` does for stage 2 (4-bit preparation, seeded LoRA, checkpointing)."""
    from training.adapter import seeded

    vlm.model.requires_grad_(False)
    vlm.adapter.requires_grad_(False)
    vlm.adapter.projector.requires_grad_(True)
    if four_bit:
        from peft import prepare_model_for_kbit_training

        vlm.model = prepare_model_for_kbit_training(
            vlm.model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    with seeded(0, "llm_lora"):
        vlm.apply_lora(LORA)
    vlm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vlm.model.enable_input_require_grads()
    return [p for p in [*vlm.model.parameters(), *vlm.adapter.projector.parameters()] if p.requires_grad]


def batch(vlm: Any, batch_size: int, words: int) -> tuple[Any, list[torch.Tensor]]:
    from lvface_mm.vlm.testing import random_face_crops

    tok = vlm.processor.tokenizer
    vocab = [w for w in tok.get_vocab() if w.isalpha() and w.islower()]
    gen = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(batch_size):
        picks = torch.randint(0, len(vocab), (words,), generator=gen).tolist()
        texts.append("<face> " + " ".join(vocab[i] for i in picks))
    return vlm.prepare(texts, None, [random_face_crops(1, seed=i) for i in range(batch_size)])


def train_steps(
    vlm: Any, params: list[torch.nn.Parameter], device: torch.device, steps: int, batch_size: int, words: int
) -> dict[str, float]:
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vlm.adapter.train()
    vlm.model.train()
    times = []
    for _ in range(steps):
        inputs, tokens = batch(vlm, batch_size, words)  # fresh tokens: a graph back to the projector
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = vlm.forward(inputs, tokens, labels=inputs.inputs["input_ids"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "loss": out.loss.item(),
        "s_per_step_median": sorted(times)[len(times) // 2],
        "tokens_per_step": int(inputs.inputs["input_ids"].numel()),
    }


def part(name: str, model_dir: Path, device: torch.device, four_bit: bool, args: argparse.Namespace) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    vlm = identity_vlm(model_dir, device, four_bit)
    load_s = time.perf_counter() - start
    params = make_trainable(vlm, four_bit)
    result = {"part": name, "load_s": round(load_s, 1), "trainable_params": sum(p.numel() for p in params)}
    result.update(train_steps(vlm, params, device, args.steps, args.batch_size, args.words))
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del vlm, params
    gc.collect()
    return result


def fsdp_part(model_dir: Path, device: torch.device, args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from training.fsdp import shard_model

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        vlm = identity_vlm(model_dir, device, four_bit=False)
        params = make_trainable(vlm, four_bit=False)
        names = shard_model(vlm.model, device, extra=[vlm.adapter.projector])
        params = [p for p in [*vlm.model.parameters(), *vlm.adapter.projector.parameters()] if p.requires_grad]
        result = {
            "part": "fsdp",
            "units": len(names),
            **train_steps(vlm, params, device, 2, args.batch_size, args.words),
        }
        del vlm, params
        gc.collect()
        return result
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape on the CPU (no 4-bit): checks the script")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--words", type=int, default=500, help="words per sample (about tokens)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        device, shape, args.words = torch.device("cpu"), "tiny", min(args.words, 32)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (use --quick for the CPU check)")
        device, shape = torch.device("cuda", 0), "7b"
        print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}), flush=True)
    ok = True
    with tempfile.TemporaryDirectory(prefix="adapter-7b-") as tmp:
        model_dir = Path(tmp)
        start = time.perf_counter()
        write_random_llm(shape, model_dir, device)
        print(json.dumps({"part": "write", "shape": shape, "s": round(time.perf_counter() - start, 1)}), flush=True)
        results = []
        for name, four_bit in (("qlora", not args.quick), ("bf16", False)):
            results.append(part(name, model_dir, device, four_bit, args))
            print(json.dumps(results[-1]), flush=True)
        if "peak_gib" in results[0]:
            ok = results[0]["peak_gib"] < BUDGET_GIB
            print(
                json.dumps(
                    {
                        "qlora_peak_gib": results[0]["peak_gib"],
                        "budget_gib": BUDGET_GIB,
                        "fits": ok,
                        "qlora_over_bf16_memory": round(results[0]["peak_gib"] / results[1]["peak_gib"], 3),
                    }
                )
            )
        print(json.dumps(fsdp_part(model_dir, device, args)), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
