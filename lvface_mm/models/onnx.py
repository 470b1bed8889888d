"""ONNX export of FaceViT and an onnxruntime encoder that runs our exports and the official files.

The export follows the official LVFace converter (`torch2onnx_v1.py`, reference/lvface.md §4):
eval mode, TorchScript-based exporter, one float32 input named `data` of shape
(batch_size, 3, 112, 112) with a dynamic batch axis, one (batch_size, 512) output holding the raw
(not L2-normalised) embedding, fp32 weights, and no normalisation inside the graph, so inputs are
RGB crops already scaled to [-1, 1]. The official `.onnx` files name their output with an
auto-generated number; `OnnxEncoder` reads both names from the graph, so it needs neither.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import weights_fingerprint

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    opset: int | None = None,
    batch_size: int = 2,
    output_name: str | None = OUTPUT_NAME,
) -> Path:
    """Write `model` as an ONNX graph mapping (N, 3, 112, 112) crops in [-1, 1] to (N, 512) raw embeddings.

    The file appears atomically: an interrupted or failed export leaves any previous file at `path`
    untouched. The model is traced in eval mode on a float32 CPU copy when it lives elsewhere or in
    another dtype; the caller's module is not modified.

    Args:
        model: a FaceViT (anything with `config.img_size` / `config.in_chans`, returning (N, D)).
        path: destination `.onnx` file.
        opset: ONNX opset; None uses the exporter's default (what the official converter does).
        batch_size: batch of the dummy input used for tracing; the batch axis is dynamic anyway.
        output_name: name of the output; None leaves the exporter's auto-generated number, like the
            official files.

    Returns:
        The path written.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if opset is not None and not 7 <= opset <= 25:
        raise ValueError(f"opset must be an ONNX opset between 7 and 25, got {opset}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give an .onnx file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist (needed for {path})")
    params = list(model.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)  # official files are fp32
    config = model.config
    dummy = torch.zeros(batch_size, config.in_chans, config.img_size, config.img_size)

    dynamic_axes = {INPUT_NAME: {0: "batch_size"}}
    if output_name:
        dynamic_axes[output_name] = {0: "batch_size"}
    tmp = path.with_name(f".{path.name}.partial")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The input-shape check in PatchEmbed is Python control flow; the tracer warns about it
            # although the exported graph is meant to fix C, H and W anyway.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The TorchScript exporter is deprecated in favour of the torch.export one, which needs
            # onnxscript and writes a different graph; we keep the official converter's path.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[output_name] if output_name else None,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,  # the TorchScript exporter, as the official converter; no onnxscript needed
            )
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    return path


def onnx_cache_dir() -> Path:
    """Where `cached_onnx_export` keeps its files: `$LVFACE_MM_ONNX_CACHE`, else
    `$XDG_CACHE_HOME/lvface_mm/onnx`, else `~/.cache/lvface_mm/onnx`."""
    if os.environ.get("LVFACE_MM_ONNX_CACHE"):
        return Path(os.environ["LVFACE_MM_ONNX_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "lvface_mm" / "onnx"


def cached_onnx_export(model: nn.Module, cache_dir: str | Path | None = None) -> Path:
    """The ONNX export of `model`'s current weights, written once into `cache_dir` and reused after.

    The file is named by `weights_fingerprint`, so changed weights get a new file and an unchanged
    model (the same official checkpoint, the same seed) never exports twice. Exports appear
    atomically (see `export_onnx`), so an interrupted export leaves no half-written file behind.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else onnx_cache_dir()
    path = folder / f"{type(model).__name__.lower()}-{weights_fingerprint(model)[:24]}.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    return export_onnx(model, path)


class OnnxEncoder:
    """Runs an ONNX face encoder with onnxruntime: (N, 3, 112, 112) float32 in [-1, 1] -> (N, D) raw embeddings.

    Works with `export_onnx` files and the official LVFace `.onnx` files: the input and output names
    and the expected crop shape are read from the graph.

    Args:
        path: the `.onnx` file.
        providers: onnxruntime execution providers in order of preference; None uses the CPU provider.
        num_threads: intra-op threads; None lets onnxruntime decide (all physical cores).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, num_threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError("OnnxEncoder needs onnxruntime: pip install 'lvface-mm[onnx]'") from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/NoSuchFile types
            raise ValueError(f"{self.path}: onnxruntime cannot load it as a model ({exc})") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ValueError(
                f"{self.path}: expected a face encoder with one input and an embedding output, got inputs "
                f"{[i.name for i in inputs]} and outputs {[o.name for o in outputs]}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        # Fixed dims of the input (C, H, W); symbolic or unknown ones are None and accept anything.
        self.input_shape: tuple[int | None, ...] = tuple(d if isinstance(d, int) else None for d in inputs[0].shape)
        last = outputs[0].shape[-1] if outputs[0].shape else None
        self.feature_dim: int | None = last if isinstance(last, int) else None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embed a batch of normalised crops; returns a float32 (N, D) numpy array (raw, not L2-normalised)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
        x = np.asarray(x)
        if x.dtype != np.float32:
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(
                    f"{self.path.name}: input must be float crops normalised to [-1, 1], got dtype {x.dtype} "
                    "(use lvface_mm.faces.to_model_input on uint8 crops)"
                )
            x = x.astype(np.float32)
        expected = self.input_shape[1:]
        if x.ndim != len(self.input_shape) or any(e is not None and e != s for e, s in zip(expected, x.shape[1:])):
            want = ", ".join("?" if d is None else str(d) for d in expected)
            raise ValueError(f"{self.path.name}: input must have shape (N, {want}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros((0, self.feature_dim or 0), dtype=np.float32)
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x)})[0]
        return np.asarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return f"OnnxEncoder({str(self.path)!r}, input={self.input_name!r}, output={self.output_name!r})"
