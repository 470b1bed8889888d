"""Whole-photo and text embeddings in one space (open_clip), for "at the beach"-style queries.

Faces say *who* is in a photo; CLIP says *what* the photo shows. The photo index stores one CLIP
image embedding per photo and ranks photos by cosine to a CLIP text embedding.

Offline rule: nothing downloads unless asked. ``ClipEncoder.from_pretrained`` uses the Hugging
Face cache (or a local file) and, when the weights are not there and the machine is offline,
raises ``WeightsNotAvailableError`` naming the repo and file to fetch. ``ClipEncoder.tiny``
builds a small random CLIP for tests and ``--tiny`` demos (the BPE vocabulary ships with open_clip).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..models.pretrained import WeightsNotAvailableError

__all__ = ["ClipConfig", "ClipEncoder"]

# OpenAI CLIP normalisation, which the LAION/OpenCLIP ViT checkpoints also use.
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipConfig:
    """Which CLIP to load: an open_clip architecture name and a pretrained tag or local file."""

    model_name: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("ClipConfig.model_name must name an open_clip architecture, e.g. 'ViT-B-32'")
        if self.batch_size < 1:
            raise ValueError(f"ClipConfig.batch_size={self.batch_size!r}: expected a positive integer")

    @property
    def key(self) -> str:
        """Identifies the embedding space; stored with an index so mixed spaces are refused."""
        return f"{self.model_name}/{self.pretrained or 'random'}"


def _fetch_hint(model_name: str, tag: str) -> str:
    """Which files to fetch for an open_clip pretrained tag, in words a user can act on."""
    try:
        from open_clip.pretrained import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_name, tag)
    except Exception:  # noqa: BLE001 - best effort: the hint must not hide the real error
        cfg = {}
    hub = (cfg or {}).get("hf_hub", "").rstrip("/")
    if hub:
        return (f"fetch it on a machine with internet: `huggingface-cli download {hub} open_clip_model.safetensors` "
                f"(older repos: open_clip_pytorch_model.bin) and copy the Hugging Face cache (HF_HOME) here, or pass "
                f"the downloaded file as the pretrained value")
    url = (cfg or {}).get("url", "")
    if url:
        return f"download {url} and pass the file as the pretrained value"
    return f"open_clip knows no weights {model_name}/{tag}; pass a local checkpoint file as the pretrained value"


class ClipEncoder:
    """L2-normalised CLIP image and text embeddings on CPU or the module's device."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, image_size: int, key: str,
                 batch_size: int = 32) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.key = key
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, config: ClipConfig | None = None, *, device: str | torch.device = "cpu",
                        cache_dir: str | None = None) -> ClipEncoder:
        import open_clip

        config = config or ClipConfig()
        try:
            model = open_clip.create_model(config.model_name, pretrained=config.pretrained, device=device,
                                           cache_dir=cache_dir, require_pretrained=config.pretrained is not None)
        except RuntimeError as exc:
            if config.pretrained and "download" in str(exc).lower():
                raise WeightsNotAvailableError(
                    f"CLIP weights {config.model_name} / {config.pretrained} are not in the local cache and cannot "
                    f"be downloaded here. {_fetch_hint(config.model_name, config.pretrained)}") from exc
            raise
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        return cls(model, open_clip.get_tokenizer(config.model_name), size, config.key, config.batch_size)

    @classmethod
    def tiny(cls, seed: int = 0, embed_dim: int = 64) -> ClipEncoder:
        """A random 3.4 M-parameter CLIP (64 px images, 2+2 layers): plumbing, not meaning."""
        import open_clip
        from open_clip.model import CLIP

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIP(embed_dim=embed_dim,
                         vision_cfg={"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
                         text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2})
        return cls(model, open_clip.get_tokenizer("ViT-B-32"), 64, f"tiny-random-{seed}-{embed_dim}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") else \
            int(self.encode_text(["x"]).shape[1])

    def _preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, S, S): shorter side to S (bicubic), centre crop, CLIP normalisation."""
        from PIL import Image

        im = Image.fromarray(image)
        w, h = im.size
        scale = self.image_size / min(w, h)
        im = im.resize((max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))),
                       Image.Resampling.BICUBIC)
        left = (im.size[0] - self.image_size) // 2
        top = (im.size[1] - self.image_size) // 2
        im = im.crop((left, top, left + self.image_size, top + self.image_size))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(_MEAN)[:, None, None]) / torch.tensor(_STD)[:, None, None]

    @torch.inference_mode()
    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images -> (N, D) float32, L2-normalised."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self._preprocess(im) for im in images[start : start + self.batch_size]])
            out.append(self.model.encode_image(batch.to(self.device), normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> (N, D) float32, L2-normalised."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu().numpy()
