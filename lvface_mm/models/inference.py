"""Putting an encoder in its fastest exact form for inference, and choosing a reduced precision
only where the hardware runs it natively.

fp32 is the default everywhere because it reproduces the official CPU/ONNX outputs to float
rounding. bf16 is worth it on CPUs with native bf16 matmuls (AVX512-BF16 or AMX); on others, such as
AVX2-only x86, PyTorch falls back to a scalar kernel that is about 35x slower than fp32 (measured
1.9 vs 66.5 GFLOP per CPU-second on the AVX2 AMD EPYC this project is tested on), so "auto" keeps
fp32 there.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

DTypeName = Literal["fp32", "bf16", "fp16", "auto"]

DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU features that multiply bf16 matrices in hardware


def cpu_flags() -> frozenset[str]:
    """This CPU's feature names as torch reports them (Linux /proc/cpuinfo as a fallback on older torch)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return frozenset(name for name, present in get().items() if present is True)
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(word for line in f if line.startswith("flags") for word in line.split(":", 1)[1].split())
    except OSError:
        return frozenset()


def cpu_has_native_bf16(flags: Iterable[str] | None = None) -> bool:
    """True when this CPU (or one with `flags`) multiplies bf16 matrices in hardware (AVX512-BF16 or AMX-BF16)."""
    present = frozenset(flags) if flags is not None else cpu_flags()
    return any(flag in present for flag in NATIVE_BF16_FLAGS)


# -- the bf16 decision for FaceEmbedder(backend="auto") -------------------------------------------------
# bf16 replaces the exact fp32 path only if it does not change what the encoder says: on a trained
# encoder every embedding keeps cosine >= BF16_MIN_COSINE to its fp32 embedding and the verification
# accuracy moves by at most BF16_MAX_ACCURACY_CHANGE. benchmarks/bench_bf16.py measures it;
# benchmarks/results/encoder.md has the numbers behind BF16_AUTO_MEASURED.
BF16_MIN_COSINE = 0.999
BF16_MAX_ACCURACY_CHANGE = 0.001
# Measured (bench_bf16.py, tiny encoder trained on synthetic identities, 4 runs): cosine >= 0.99997 always, but
# 10-fold accuracy 0.9400/0.9350/0.9377/0.9333 -> 0.9400/0.9353/0.9343/0.9250 and 7 of 7200 pair decisions
# changed, all for the worse: not "the same accuracy", so no.
BF16_AUTO_MEASURED = False


def bf16_auto_decision(cos_min: float, acc_fp32: float, acc_bf16: float) -> bool:
    """The rule: may `backend="auto"` run bf16, given the measured worst cosine and the two accuracies?"""
    return cos_min >= BF16_MIN_COSINE and abs(acc_fp32 - acc_bf16) <= BF16_MAX_ACCURACY_CHANGE


def auto_uses_bf16(flags: Iterable[str] | None = None, decision: bool | None = None) -> bool:
    """Whether `FaceEmbedder(backend="auto")` runs a CPU FaceViT in bf16 PyTorch instead of fp32 onnxruntime:
    only where the CPU multiplies bf16 natively and only if the measured decision is yes.

    Args:
        flags: CPU feature names (default: this CPU's); tests inject them.
        decision: the accuracy decision (default: `BF16_AUTO_MEASURED`).
    """
    decision = BF16_AUTO_MEASURED if decision is None else decision
    return bool(decision) and cpu_has_native_bf16(flags)


def fastest_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The reduced precision that is native on `device`, or float32 where none is."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float16  # mps and other accelerators


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str = "cpu") -> torch.dtype | None:
    """Map "fp32"/"bf16"/"fp16"/"auto"/torch dtypes to a torch dtype; None stays None (keep as is)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if dtype == "auto":
        return fastest_dtype(device)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_NAMES)} or 'auto'")
    return DTYPE_NAMES[dtype]


def prepare_for_inference(
    model: nn.Module,
    dtype: torch.dtype | DTypeName | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Eval mode, no parameter gradients, and the chosen device and precision (in place; returns `model`).

    Run the prepared model under `torch.inference_mode()`. FaceViT already uses PyTorch's fused
    attention (scaled_dot_product_attention), so nothing else needs switching on.

    Args:
        model: a FaceViT (or any encoder module).
        dtype: None keeps the current precision (fp32 for a fresh model: exact parity with the
            official outputs); "auto" picks `fastest_dtype(device)`; or "fp32" / "bf16" / "fp16" / a
            torch dtype.
        device: where to move the model; None keeps it where it is.
    """
    params = list(model.parameters())
    current = params[0].device if params else torch.device("cpu")
    target = torch.device(device) if device is not None else current
    resolved = resolve_dtype(dtype, target)
    if resolved == torch.bfloat16 and target.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "bf16 on a CPU without AVX512-BF16/AMX runs through a slow fallback kernel (often 10-100x "
            "slower than fp32); use dtype='auto' or 'fp32' here",
            RuntimeWarning,
            stacklevel=2,
        )
    model.eval().requires_grad_(False)
    return model.to(device=target, dtype=resolved) if resolved is not None else model.to(device=target)
