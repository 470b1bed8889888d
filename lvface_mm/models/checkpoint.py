"""Reading FaceViT checkpoints: official flat `.pt` state dicts, wrapped or `module.`-prefixed
training checkpoints, and safetensors. Loading is always strict; a checkpoint of another variant
is named by the variant it looks like instead of failing with a wall of missing keys."""

from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from .registry import get_model_spec, list_models

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "backbone", "encoder", "module")
_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .pt/.pth/.bin (torch pickle, weights only) or .safetensors."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory; give the .pt/.safetensors file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (an interrupted download or copy?)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})") from exc
    expected = "Expected a state dict saved with torch.save (official LVFace .pt files are) or a .safetensors file."
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols just before it fails; the error says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        code = pickled_code(path, str(exc))
        if code is not None:
            # Not a damaged file: a pickle that would import and run Python code. Never suggest
            # weights_only=False here: that is exactly how such a file runs its code.
            raise ValueError(
                f"{path}: refused: it contains code ({code}), which loading would run. Re-save the weights alone "
                f"(torch.save(model.state_dict(), ...)) or as .safetensors. {expected}"
            ) from None
        raise ValueError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt? {expected}") from None
    except Exception as exc:  # zip reader, unpickler and storage errors; KeyError says only "101" here
        readable = isinstance(exc, RuntimeError) and str(exc)
        detail = str(exc).splitlines()[0][:120] if readable else "unrecognised content"
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt? ({detail}). {expected}"
        ) from None
    return unwrap_state_dict(obj, source=str(path))


def pickled_code(path: Path, error: str) -> str | None:
    """What code a checkpoint refused by torch's weights-only loader would import, or None when the
    file is simply not a (readable) pickle. torch names the global for zip checkpoints; a bare
    pickle is scanned for the opcodes that import (GLOBAL, STACK_GLOBAL) without running it."""
    import pickletools
    import re

    named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", error)
    if named:
        return f"a reference to {named.group(1)}"
    try:
        with open(path, "rb") as f:
            imports = [arg for op, arg, _ in pickletools.genops(f) if op.name in ("GLOBAL", "STACK_GLOBAL")]
    except Exception:  # noqa: BLE001 - not a well-formed pickle: corrupt, not code
        return None
    return "pickled Python objects besides tensors" if imports or "GLOBAL" in error else None


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common wrappers and strip DDP/compile prefixes."""
    for _ in range(3):  # wrappers nest at most a couple of levels in practice
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{source}: no state dict of tensors found (top-level keys: "
            f"{sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})"
        )
    state = dict(obj)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def infer_config_fields(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Architecture fields readable from tensor shapes (embed_dim, depth, feature_dim, patch_size)."""
    fields: dict[str, int] = {}
    if "pos_embed" in state:
        fields["embed_dim"] = int(state["pos_embed"].shape[-1])
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks:
        fields["depth"] = max(blocks) + 1
    if "feature.3.weight" in state:
        fields["feature_dim"] = int(state["feature.3.weight"].shape[0])
    if "patch_embed.proj.weight" in state:
        fields["patch_size"] = int(state["patch_embed.proj.weight"].shape[-1])
    return fields


def guess_variant(state: dict[str, torch.Tensor]) -> str | None:
    """Registered model name whose architecture matches the checkpoint's shapes, if any."""
    fields = infer_config_fields(state)
    return model_with_fields(fields) if fields else None


def model_with_fields(fields: dict[str, int | float]) -> str | None:
    """The first registered model (by name) whose FaceViTConfig has all these field values, if any."""
    for name in list_models():
        if all(getattr(get_model_spec(name).config, k) == v for k, v in fields.items()):
            return name
    return None


def load_checkpoint(model: nn.Module, path: str | Path, model_name: str | None = None) -> None:
    """Load a checkpoint into `model` with strict=True and a clear error when it does not fit.

    Tensors are cast to the model's dtypes and moved to its device. A model on the meta device takes
    the checkpoint's tensors as they are (`assign=True`), which checks keys and shapes without memory.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        guess = guess_variant(state)
        fields = infer_config_fields(state)
        looks = f"It looks like {guess!r}" if guess else f"Its shapes say {fields}"
        detail = []
        if mismatched:
            k = mismatched[0]
            detail.append(f"{len(mismatched)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}, "
                          f"model {tuple(own[k].shape)})")
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        raise ValueError(
            f"{path} does not fit {model_name or type(model).__name__}: {'; '.join(detail)}. {looks}"
            f"{f'; use create_model({guess!r}, checkpoint_path=...)' if guess and guess != model_name else ''}."
        )
    if any(t.is_meta for t in own.values()):
        # assign=True keeps the checkpoint's tensors, so give them the dtypes the model declares.
        state = {k: v.to(dtype=own[k].dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
    else:
        model.load_state_dict(state, strict=True)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 (hex) of a model's config, every state-dict entry (name, dtype, shape, bytes) and the torch
    version: the key for anything derived from the weights (ONNX exports, cached embeddings)."""
    digest = hashlib.sha256(f"{torch.__version__}|{getattr(model, 'config', type(model).__name__)!r}".encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())  # (numel * itemsize,) raw bytes
    return digest.hexdigest()
