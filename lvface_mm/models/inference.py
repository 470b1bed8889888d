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


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX-BF16)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        caps = get()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    try:  # older torch: read the kernel's flags
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
