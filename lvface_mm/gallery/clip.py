"""Whole-photo and text embeddings in one space (open_clip), for "at the beach"-style queries.

Faces say *who* is in a photo; CLIP says *what* the photo shows. The photo index stores one CLIP
image embedding per photo and ranks photos by cosine to a CLIP text embedding.

Offline rule: nothing downloads unless asked. ``ClipEncoder.from_pretrained`` uses the Hugging
Face cache (or a local file) and, when the weights are not there and the machine is offline,
raises ``WeightsNotAvailableError`` naming the repo and file to fetch. ``ClipEncoder.tiny``
builds a small random CLIP for tests and ``--tiny`` demos (the BPE vocabulary ships with open_clip).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..models.pretrained import WeightsNotAvailableError, hub_endpoint, hub_offline, hub_reachable

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
    """Which file to fetch for an open_clip pretrained tag, in words a user can act on."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, tag) or {}
    repo, filename = os.path.split(cfg.get("hf_hub", ""))
    if repo:
        # open_clip looks for the safetensors twin of the file first, then the file itself; either works.
        filename = filename or "open_clip_pytorch_model.bin"
        safe = filename.rsplit(".", 1)[0].replace("pytorch_model", "model") + ".safetensors"
        return (f"On a machine with internet run `hf download {repo} {safe}` (or `{filename}`), then copy the "
                f"Hugging Face cache (HF_HOME) here, or pass the downloaded file as the pretrained value "
                f"(--clip-pretrained /path/to/{safe})")
    if cfg.get("url"):
        return f"Download {cfg['url']} and pass the file as the pretrained value (--clip-pretrained /path/to/file)"
    return f"open_clip knows no weights {model_name}/{tag}; pass a local checkpoint file as the pretrained value"


def _resolve_weights(config: ClipConfig, cache_dir: str | None) -> str | None:
    """A local file for ``config.pretrained`` (a file path, or a tag fetched from the Hub cache), found
    before the model is built so a missing file is reported in seconds, not after a full init."""
    if config.pretrained is None:
        return None
    if os.path.isfile(config.pretrained):
        return config.pretrained
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(config.model_name, config.pretrained)
    if not cfg:
        tags = list_pretrained_tags_by_model(config.model_name)
        raise FileNotFoundError(f"CLIP weights {config.pretrained!r}: neither a file nor a known tag of "
                                f"{config.model_name} (known tags: {', '.join(tags) or 'none'})")
    cached = _cached_hub_file(cfg, cache_dir)
    if cached is not None:
        return cached
    missing = f"CLIP weights {config.model_name} / {config.pretrained} are not in the local cache and cannot be " \
        f"downloaded here"
    if cfg.get("hf_hub") and not hub_offline() and not hub_reachable():
        # Fail in seconds: unreachable, the hub client retries for about a minute before giving up.
        raise WeightsNotAvailableError(
            f"{missing}: the Hugging Face Hub ({hub_endpoint()}) cannot be reached (set HF_HUB_OFFLINE=1 to use only "
            f"the local cache without trying the network). {_fetch_hint(config.model_name, config.pretrained)}")
    try:
        return download_pretrained(cfg, cache_dir=cache_dir)
    except (FileNotFoundError, OSError, RuntimeError) as exc:
        raise WeightsNotAvailableError(f"{missing}. {_fetch_hint(config.model_name, config.pretrained)}") from exc


def _cached_hub_file(cfg: dict, cache_dir: str | None) -> str | None:
    """The Hub file open_clip would download for ``cfg`` if it is already cached (safetensors twin
    first, as open_clip prefers it), without any network access; else None."""
    repo, filename = os.path.split(cfg.get("hf_hub", ""))
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    filename = filename or "open_clip_pytorch_model.bin"
    safe = filename.rsplit(".", 1)[0].replace("pytorch_model", "model") + ".safetensors"
    for name in (safe, filename):
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


class ClipEncoder:
    """L2-normalised CLIP image and text embeddings on CPU or the module's device."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, image_size: int, key: str,
                 batch_size: int = 32, mean: tuple[float, ...] = _MEAN, std: tuple[float, ...] = _STD) -> None:
        self.model = model.eval()
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.key = key
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, config: ClipConfig | None = None, *, device: str | torch.device = "cpu",
                        cache_dir: str | None = None) -> ClipEncoder:
        """Build from the Hugging Face cache or a local file; raises ``WeightsNotAvailableError`` with
        the file to fetch when offline and not cached. ``pretrained=None`` gives random weights."""
        import open_clip

        config = config or ClipConfig()
        weights = _resolve_weights(config, cache_dir)
        try:
            model = open_clip.create_model(config.model_name, pretrained=weights, device=device)
        except Exception as exc:  # torch/safetensors/open_clip raise many types for a junk or mismatched file
            if weights is None:
                raise
            import pickle

            from ..models.checkpoint import pickled_code

            code = pickled_code(weights, str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
            if code is not None:  # never pass on torch's advice to load it with weights_only=False
                raise ValueError(f"CLIP weights {weights}: refused: it contains code ({code}), which loading would "
                                 "run; give an open_clip .safetensors/.bin file of weights only") from None
            first = str(exc).strip("'\" ").splitlines()[0] if str(exc).strip() else ""
            if isinstance(exc, KeyError) or first.isdigit() or not first:  # torch's unpickler says only "KeyError: 101"
                first = "unrecognised content"
            raise ValueError(f"CLIP weights {weights}: not a usable {config.model_name} checkpoint ({first[:200]}); "
                             "give an open_clip .safetensors/.bin file of that architecture") from exc
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        pp = getattr(model.visual, "preprocess_cfg", None) or {}
        return cls(model, open_clip.get_tokenizer(config.model_name), size, config.key, config.batch_size,
                   mean=tuple(pp.get("mean", _MEAN)), std=tuple(pp.get("std", _STD)))

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
        """Embedding width (found by encoding one word, so any open_clip tower layout works)."""
        if not hasattr(self, "_dim"):
            self._dim = int(self.encode_text(["photo"]).shape[1])
        return self._dim

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
        return (x - self.mean) / self.std

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
