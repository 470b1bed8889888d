"""Shard a VLM/LLM that does not fit one device over the processes with PyTorch FSDP2 (`fully_shard`).

    shard_model(vlm.model, FsdpConfig())        # after LoRA is applied, before the optimizer is built

Every decoder layer becomes one FSDP unit (its frozen base weights and its LoRA weights are split by
rows over the processes and gathered only while the layer runs), then the root module. Gradients of
the trainable (LoRA) parameters are reduce-scattered and averaged over the processes, so N processes
with batch B each step exactly like one process with batch N*B.

Why `fully_shard` and not accelerate's `FullyShardedDataParallelPlugin`: accelerate 1.16 enables FSDP
only for GPU-type process groups (`AcceleratorState` keeps `MULTI_CPU` and ignores the plugin), and
our loop owns the wrapping of the task (DDP today). FSDP2 itself runs on any process group accelerate
or torchrun starts (gloo on CPU, NCCL on GPUs), so the same code is tested here on CPU.

Status: the sharding is tested (tests/test_adapter_fsdp.py: 2 gloo processes train LoRA exactly like
one process). `training.adapter` does not call it yet: the shared loop wraps the task in DDP and
checkpoints replicated tensors, and both need an FSDP path (skip DDP for a task whose trainable
parameters are all FSDP-managed; gather DTensor model and optimizer state with
`torch.distributed.checkpoint.state_dict.get_state_dict(..., full_state_dict=True)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class FsdpConfig:
    """How the model is sharded.

    Args:
        layer_classes: class names of the modules that become FSDP units; () = the model's own
            `_no_split_modules` (transformers lists its decoder layers there, e.g. "LlamaDecoderLayer").
        reshard_after_forward: free each layer's gathered weights after its forward (least memory;
            gathered again in backward). False keeps them until backward (faster, more memory).
    """

    layer_classes: tuple[str, ...] = ()
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if not all(isinstance(c, str) and c for c in self.layer_classes):
            raise ValueError(f"FsdpConfig.layer_classes must be class names, got {self.layer_classes!r}")


def layer_classes(model: nn.Module, config: FsdpConfig) -> tuple[str, ...]:
    """The class names that become FSDP units: the config's, else the model's `_no_split_modules`."""
    if config.layer_classes:
        return config.layer_classes
    found: list[str] = []
    for module in model.modules():  # a PEFT wrapper or a VLM holds the transformers model(s) inside
        for name in getattr(module, "_no_split_modules", None) or ():
            if name not in found:
                found.append(name)
    if not found:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class (`_no_split_modules`); "
            "set fsdp.layer_classes, e.g. ['LlamaDecoderLayer']"
        )
    return tuple(found)


def shard_model(
    model: nn.Module, config: FsdpConfig | None = None, mesh: Any = None, extra: Sequence[nn.Module] = ()
) -> list[str]:
    """Apply FSDP2 to every layer of `layer_classes`, to each module of `extra`, then to `model`.

    Args:
        model: the model, on this process's device, with LoRA already applied (PEFT must see the
            original Linear modules).
        config: see `FsdpConfig`.
        mesh: a 1-d `DeviceMesh` over the processes (None: all processes of the default group).
        extra: other trainable modules to shard as their own units (e.g. the identity projector).

    Returns:
        The names of the sharded layers (for logs and tests). Collective: every process calls it.
    """
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import fully_shard

    config = config or FsdpConfig()
    if not torch.distributed.is_initialized():
        raise RuntimeError("shard_model needs a process group (accelerate launch / torchrun)")
    if mesh is None:
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    classes = layer_classes(model, config)
    sharded = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=config.reshard_after_forward)
            sharded.append(name)
    if not sharded:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f"no module of class {list(classes)} in {type(model).__name__}; classes present: {present}")
    for module in extra:
        fully_shard(module, mesh=mesh, reshard_after_forward=config.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=config.reshard_after_forward)
    return sharded


def full_state_dict(module: nn.Module, keep: Any = None) -> dict[str, torch.Tensor]:
    """The module's state with every sharded tensor gathered to its full value on the CPU. Collective.

    Args:
        keep: optional predicate on the key (e.g. `lambda k: "lora_" in k`): gather only those.
    """
    out = {}
    for key, value in module.state_dict().items():
        if keep is not None and not keep(key):
            continue
        full = value.full_tensor() if hasattr(value, "full_tensor") else value  # DTensor -> torch.Tensor
        out[key] = full.detach().cpu()
    return out


__all__ = ["FsdpConfig", "full_state_dict", "layer_classes", "shard_model"]
