"""Crop encoders behind the FaceEmbedder: the PyTorch FaceViT or an ONNX file in onnxruntime.

Both take normalised (N, 3, 112, 112) float32 crops and give raw (unnormalised) (N, 512) float32
features; the PyTorch one can also give the (N, 144, D) patch tokens the VLM bridge consumes.
Flip-test (sum of the features of a crop and its mirror, as in the IJB protocol) is done here so
both backends do it the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn


class TorchCropEncoder:
    """Runs a FaceViT (or any module mapping crops to (N, 512)) in eval mode on its device and dtype."""

    name = "torch"

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        param = next(model.parameters(), None)
        self.device = (
            torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
        )
        self.dtype = dtype or (param.dtype if param is not None else torch.float32)
        self.model = model.eval().to(device=self.device, dtype=self.dtype)

    @property
    def supports_tokens(self) -> bool:
        return hasattr(self.model, "forward_features") and hasattr(self.model, "forward_head")

    @torch.inference_mode()
    def __call__(
        self, x: torch.Tensor, flip: bool = False, return_tokens: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        n = x.shape[0]
        x = x.to(device=self.device, dtype=self.dtype)
        if flip:
            x = torch.cat([x, x.flip(-1)])  # (2N, 3, 112, 112): originals, then mirrors
        tokens = None
        if return_tokens:
            if not self.supports_tokens:
                raise TypeError(
                    f"{type(self.model).__name__} has no forward_features/forward_head; tokens need a FaceViT"
                )
            all_tokens = self.model.forward_features(x)  # (N or 2N, 144, D)
            raw = self.model.forward_head(all_tokens)
            tokens = all_tokens[:n].float().cpu().numpy()  # tokens of the original crops only
        else:
            raw = self.model(x)
        raw = raw.float()
        if raw.ndim != 2 or raw.shape[0] != x.shape[0]:
            raise ValueError(f"the model returned shape {tuple(raw.shape)}, expected ({x.shape[0]}, feature_dim)")
        if flip:
            raw = raw[:n] + raw[n:]
        return raw.cpu().numpy(), tokens


class OnnxCropEncoder:
    """Runs an ONNX face encoder (our exports or the official LVFace .onnx) with onnxruntime."""

    name = "onnx"
    supports_tokens = False

    def __init__(self, path: str | Path, providers: list[str] | None = None, num_threads: int | None = None) -> None:
        try:
            from ..models.onnx import OnnxEncoder
        except ImportError as exc:
            raise ImportError(f"the ONNX backend needs onnxruntime: pip install 'lvface-mm[onnx]' ({exc})") from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX encoder file {self.path} does not exist")
        self._run: Callable[[np.ndarray], np.ndarray] = OnnxEncoder(
            self.path, providers=providers, num_threads=num_threads
        )
        self.device = torch.device("cpu")  # inputs are handed over as numpy
        self.dtype = torch.float32

    def __call__(
        self, x: torch.Tensor, flip: bool = False, return_tokens: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if return_tokens:
            raise ValueError(
                "patch tokens are only available with backend='torch' (the ONNX graph outputs the embedding)"
            )
        n = x.shape[0]
        if flip:
            x = torch.cat([x, x.flip(-1)])
        raw = np.asarray(self._run(np.ascontiguousarray(x.float().cpu().numpy())), dtype=np.float32)
        if raw.ndim != 2 or raw.shape[0] != x.shape[0]:
            raise ValueError(f"{self.path} returned shape {raw.shape}, expected ({x.shape[0]}, feature_dim)")
        if flip:
            raw = raw[:n] + raw[n:]
        return raw, None


class CachedOnnxCropEncoder:
    """A FaceViT run by onnxruntime from a cached export of its own weights (the CPU default).

    On CPUs onnxruntime's fp32 GEMMs beat PyTorch's on the 144-row matrices of a 112x112 ViT (see
    benchmarks/results/encoder.md), so `FaceEmbedder(backend="auto")` exports the model once
    (`cached_onnx_export`) and embeds through the export. The PyTorch module stays for what the
    graph cannot give: patch tokens (`return_tokens=True`) go through `torch_encoder`. The export
    holds the weights as they were at construction: after changing the module's weights, build a
    new embedder (or use backend="torch").
    """

    name = "onnx-auto"
    supports_tokens = True

    def __init__(self, torch_encoder: TorchCropEncoder, providers: list[str] | None = None) -> None:
        from ..models.onnx import cached_onnx_export

        if torch_encoder.device.type != "cpu" or torch_encoder.dtype != torch.float32:
            raise ValueError(
                f"the cached ONNX encoder runs fp32 CPU models, got {torch_encoder.dtype} on {torch_encoder.device}"
            )
        self.torch_encoder = torch_encoder
        self.model = torch_encoder.model
        # As many threads as PyTorch has, so torch.set_num_threads / OMP_NUM_THREADS keep their meaning.
        path = cached_onnx_export(self.model)
        self.onnx = OnnxCropEncoder(path, providers=providers, num_threads=torch.get_num_threads())
        self.path = self.onnx.path
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def __call__(
        self, x: torch.Tensor, flip: bool = False, return_tokens: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if return_tokens:
            return self.torch_encoder(x, flip=flip, return_tokens=True)
        return self.onnx(x, flip=flip)
