"""Shard a VLM/LLM that does not fit one device over the processes with PyTorch FSDP2 (`fully_shard`).

    shard_model(vlm.model, device)   # after LoRA is applied, before the optimizer is built

Every decoder layer becomes one FSDP unit (its frozen base weights and its LoRA weights are split by
rows over the processes and gathered only while the layer runs), then the root module (embeddings,
LM head, vision tower). Gradients of the sharded trainable (LoRA) parameters are reduce-scattered and
averaged over the processes, so N processes with batch B each step exactly like one process with
batch N*B. Small trainable modules outside the model (the identity projector, an encoder LoRA) stay
whole on every process; the loop averages their gradients (`sync_replicated_grads`) instead of DDP.

`training.adapter` turns it on with its run config's `fsdp:` section (`AdapterFsdpConfig`,
`enabled: true`); the loop (`training.loop.Trainer`) sees FSDP units in the task and then: skips
DDP, delays the gradient reduce-scatter to the last micro-batch of a step, clips the global norm
over sharded and whole gradients together (`clip_grad_norm_`), and checkpoints through
`torch.distributed.checkpoint.state_dict.get_state_dict/set_state_dict` with full (gathered) state
dicts, in the same single-file format as an unsharded run (`full_training_state`), so a checkpoint
resumes on any number of processes, with or without FSDP.

Why `fully_shard` and not accelerate's `FullyShardedDataParallelPlugin`: accelerate 1.16 enables FSDP
only for GPU-type process groups (on a CPU group `AcceleratorState` stays `MULTI_CPU` and ignores the
plugin, so it cannot be tested here), and our loop owns the wrapping of the task (DDP otherwise).
FSDP2 itself runs on any process group that accelerate or torchrun starts (gloo on CPU, NCCL on
GPUs), so the same code runs in the tests on CPU and on GPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def layer_classes(model: nn.Module, names: Sequence[str] = ()) -> tuple[str, ...]:
    """The class names that become FSDP units: `names` if given, else the model's `_no_split_modules`."""
    if names:
        return tuple(names)
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
    model: nn.Module,
    device: torch.device | None = None,
    *,
    classes: Sequence[str] = (),
    reshard_after_forward: bool = True,
    mesh: Any = None,
    extra: Sequence[nn.Module] = (),
) -> list[str]:
    """Apply FSDP2 to every layer of `classes`, to each module of `extra`, then to `model`.

    Args:
        model: the model with LoRA already applied (PEFT must see the original Linear modules). It
            may still be on the CPU: `fully_shard` moves each unit to the mesh's device as it shards
            it, so the whole model never has to fit one GPU.
        device: this process's device (None: where the model's parameters are).
        classes: class names of the modules that become FSDP units (() = the model's
            `_no_split_modules`: transformers lists its decoder layers there, e.g. "LlamaDecoderLayer").
        reshard_after_forward: free each unit's gathered weights after its forward (least memory;
            gathered again in backward); False keeps them until backward (faster, more memory).
        mesh: a 1-d `DeviceMesh` over the processes (None: all processes of the default group on `device`).
        extra: other trainable modules to shard as their own units (e.g. the identity projector).

    Returns:
        The names of the sharded layers (for logs and tests). Collective: every process calls it.
    """
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import fully_shard

    if not torch.distributed.is_initialized():
        raise RuntimeError("shard_model needs a process group (accelerate launch / torchrun)")
    if mesh is None:
        device = device if device is not None else next(model.parameters()).device
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    classes = layer_classes(model, classes)
    sharded = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
            sharded.append(name)
    if not sharded:
        present = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f"no module of class {list(classes)} in {type(model).__name__}; classes present: {present}")
    for module in extra:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
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


def uses_fsdp(module: nn.Module) -> bool:
    """True when `module` or one of its submodules was sharded with `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def is_dtensor(tensor: torch.Tensor) -> bool:
    """A parameter (or gradient) that FSDP holds as a DTensor shard."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "to_local")


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Reduce-scatter gradients after this backward (True) or keep accumulating locally (False):
    FSDP's equivalent of DDP's `no_sync()` for all micro-batches but the last of a step."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(enabled, recurse=False)


def sync_replicated_grads(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of parameters that every process holds whole (not FSDP-managed), in
    one flat all-reduce. A parameter without a gradient on this process counts as zero. Collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # (sum of numel,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float) -> float:
    """Clip the global L2 norm of sharded (DTensor) and whole gradients together; returns the norm
    before clipping, equal on every process. Collective when some gradients are sharded.

    The sharded gradients' squared norms are summed over the processes (each holds other rows);
    the whole ones are already identical everywhere and count once. Same coefficient as
    `torch.nn.utils.clip_grad_norm_`: max_norm / (norm + 1e-6), capped at 1.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_dtensor(g)]
    whole = [g for g in grads if not is_dtensor(g)]
    device = grads[0].device if grads else torch.device("cpu")
    sq_sharded = torch.zeros((), device=device)
    for g in sharded:
        sq_sharded += g.to_local().float().pow(2).sum()
    if sharded and dist.is_initialized():
        dist.all_reduce(sq_sharded, op=dist.ReduceOp.SUM)
    sq_whole = sum((g.float().pow(2).sum() for g in whole), torch.zeros((), device=device))
    total = (sq_sharded + sq_whole).sqrt()
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    for g in grads:
        g.mul_(coef)  # a DTensor scales its own rows
    return float(total)


def full_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state) with every shard gathered, on the CPU of process 0 (the other
    processes get empty dicts). Collective.

    Both come from `torch.distributed.checkpoint.state_dict.get_state_dict(full_state_dict=True)`:
    the model state is `model.state_dict()`'s keys with full tensors (for the adapter task: only the
    trainable tensors and the projector's norm), the optimizer state is keyed by parameter name, the
    same layout `training.checkpoint.optimizer_state` writes for unsharded runs.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def load_full_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optim_state: dict[str, Any],
    source: str = "checkpoint",
) -> None:
    """Load `full_training_state` output (read on every process) into the sharded model and its
    optimizer: each process keeps its own rows. Keys are checked first, naming the file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(model_state)), sorted(set(model_state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: the model does not match the checkpoint: missing keys {missing[:8]}, unexpected keys "
            f"{unexpected[:8]} (was it saved with another model, stage or LoRA setting?)"
        )
    names = {n for g in optim_state.get("param_groups", []) for n in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if names != trainable:
        raise ValueError(
            f"{source}: optimizer parameters differ from the checkpoint (only in checkpoint: "
            f"{sorted(names - trainable)[:5]}, only here: {sorted(trainable - names)[:5]})"
        )
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)


@contextlib.contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """Keep `module`'s own FSDP parameters gathered (not its sub-units') for the block. Collective.

    Generation calls the transformers model inside a PEFT wrapper directly, past the root's forward
    hooks, so the root's weights (embeddings, LM head, vision tower) must stay gathered; the decoder
    layers still gather and free theirs one at a time through their own hooks.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


__all__ = [
    "clip_grad_norm_",
    "full_state_dict",
    "full_training_state",
    "is_dtensor",
    "layer_classes",
    "load_full_training_state",
    "set_gradient_sync",
    "shard_model",
    "sync_replicated_grads",
    "unsharded",
    "uses_fsdp",
]
