"""Stage-2 adapter training: LoRA on the LLM against full fine-tuning of the same tiny LLM.

    python benchmarks/bench_adapter_training.py --quick    # hidden 192 x 4 layers, 8 timed steps each
    python benchmarks/bench_adapter_training.py            # hidden 512 x 8 layers, 30 timed steps each

Both runs train the identity adapter's stage 2 on the same VQA batches (synthetic identities,
naming + recognition, up to 2 faces, K = 2 identity tokens, precomputed embeddings) through
`IdentityAdapterTask`, with AdamW:

    lora        LoRA r=16 on every linear layer of the LLM + the projector (what training/adapter.py does)
    full        every LLM parameter + the projector

Each configuration runs in its own process. Memory is the peak resident set (VmHWM, reset right
before the first training step) minus the resident set at that moment: the training step's own
working memory (gradients, AdamW state, activations). On CUDA it is `max_memory_allocated` instead.
Throughput is the median over timed steps after 3 warm-up steps. The report goes to
benchmarks/results/adapter_training.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _memory import reset_peak_rss, status_bytes

MODES = ("lora", "full")
WARMUP = 3


def _make_data(root: Path) -> None:
    from lvface_mm.vqa.builder import VQABuildConfig, build_vqa
    from lvface_mm.vqa.sources import embedding_cluster_photos

    config = VQABuildConfig(
        num_train_unknown=2,
        num_eval_unknown=2,
        tasks=("naming", "recognition"),
        train_per_task=200,
        eval_per_task=4,
        max_faces=2,
    )
    build_vqa(embedding_cluster_photos(20, 5, dim=512, seed=0), root, config)


def child(mode: str, data: Path, hidden: int, layers: int, steps: int, batch: int) -> dict:
    """One configuration, in this process: build, train `WARMUP + steps` steps, measure."""
    from lvface_mm.tasks.identity_adapter import IdentityAdapterTask
    from lvface_mm.vqa.data import FaceStore
    from lvface_mm.vqa.rendering import RenderedDataset, SampleRenderer
    from lvface_mm.vqa.schema import load_samples
    from training.adapter import AdapterRunConfig, build_vlm, prepare_stage
    from training.config import load_config

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            "data.path": str(data),
            "output_dir": tmp,
            "model.tiny.hidden_size": str(hidden),
            "model.tiny.intermediate_size": str(4 * hidden),
            "model.tiny.num_hidden_layers": str(layers),
            "model.tiny.num_attention_heads": "8",
            "model.tiny.num_key_value_heads": "4",
            "lora.modules_to_save": "[]",
        }
        config = load_config(
            AdapterRunConfig, Path(__file__).parents[1] / "training/configs/adapter/tiny_synthetic.yaml", overrides
        )
        train = load_samples(data / "train.json")
        vlm = build_vlm(config, train + load_samples(data / "eval.json"), Path(tmp))
    if mode == "lora":
        prepare_stage(vlm, config, 2, None)
    else:  # full fine-tuning of the same LLM
        vlm.model.requires_grad_(True)
        vlm.adapter.requires_grad_(False)
        vlm.adapter.projector.requires_grad_(True)
    task = IdentityAdapterTask(vlm, "embedding").to(device).train()
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    renderer = SampleRenderer(vlm, data, config.data.prompt_mode)  # the format training uses
    dataset = RenderedDataset(train, renderer, FaceStore.open(data, "embedding"), vlm.processor.tokenizer.pad_token_id)
    batches = []
    for start in range(0, (WARMUP + steps) * batch, batch):
        items = [dataset[i % len(dataset)] for i in range(start, start + batch)]
        batches.append({k: torch.stack([it[k] for it in items]).to(device) for k in items[0]})
    activation_bytes = _saved_activation_bytes(task, batches[0])
    base = reset_peak_rss() if device.type == "cpu" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        loss = task(b)["loss"]
        loss.backward()
        if i == len(batches) - 1:
            grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    peak = (status_bytes("VmHWM") if device.type == "cpu" else torch.cuda.max_memory_allocated()) - base
    state_bytes = sum(
        t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in task.parameters())
    return {
        "mode": mode,
        "device": str(device),
        "llm_parameters": sum(p.numel() for p in vlm.model.parameters()),
        "trainable": sum(p.numel() for p in params),
        "step_s": statistics.median(times),
        "samples_per_s": batch / statistics.median(times),
        "weights_mb": weight_bytes / 2**20,
        "grads_mb": grad_bytes / 2**20,
        "adamw_mb": state_bytes / 2**20,
        "activations_mb": activation_bytes / 2**20,
        "tensor_peak_mb": (weight_bytes + grad_bytes + state_bytes + activation_bytes) / 2**20,
        "rss_peak_mb": peak / 2**20,
        "loss": float(loss),
    }


def _saved_activation_bytes(task: torch.nn.Module, batch: dict) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (parameters excluded, each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in task.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task(batch)["loss"]
    del loss
    return sum(seen.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller LLM, fewer steps")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "adapter_training.md"))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    hidden, layers, steps, batch = (192, 4, 8, 16) if args.quick else (512, 8, 30, 16)
    if args.child:
        print("RESULT" + json.dumps(child(args.child, Path(args.data), hidden, layers, steps, batch)), flush=True)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "vqa"
        _make_data(data)
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--data", str(data)] + (["--quick"] if args.quick else [])
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            results.append(json.loads(proc.stdout.split("RESULT", 1)[1]))
    lora, full = results
    lines = [
        "# Adapter training: stage 2 with LoRA against full fine-tuning",
        "",
        f"- command: `python benchmarks/bench_adapter_training.py{' --quick' if args.quick else ''}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {lora['device']}, "
        f"{torch.get_num_threads()} threads",
        f"- model: tiny Llama, hidden {hidden}, {layers} layers, {lora['llm_parameters'] / 1e6:.2f} M parameters; "
        f"batch {batch}; median of {steps} steps after {WARMUP} warm-up steps",
        "- tensor MB: what training holds at its peak, counted tensor by tensor: all weights (frozen ones too) + "
        "gradients + AdamW state + the activations autograd saves in one forward; RSS MB: peak resident memory "
        "after a reset right before the first step, minus the resident memory then (allocator caching makes it "
        "noisy; it is shown for completeness)",
        "- LoRA: r 16 on every linear layer of the LLM, output layer frozen; full: every LLM weight; both also train "
        "the projector",
        "",
        "| run | trainable params | samples/s | x full | grads + AdamW MB | activations MB | tensor MB | x full "
        "| RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['trainable']:,} | {r['samples_per_s']:.1f} "
            f"| {r['samples_per_s'] / full['samples_per_s']:.2f} | {r['grads_mb'] + r['adamw_mb']:.1f} "
            f"| {r['activations_mb']:.1f} | {r['tensor_peak_mb']:.1f} "
            f"| {r['tensor_peak_mb'] / full['tensor_peak_mb']:.2f} "
            f"| {r['rss_peak_mb']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
