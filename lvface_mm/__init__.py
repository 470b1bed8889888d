"""lvface-mm: LVFace face encoders as identity encoders for vision-language models.

The top level is lazy (PEP 562): `import lvface_mm.losses` does not pull in timm, torchvision or
transformers. Subpackages: `lvface_mm.models`, `.faces`, `.data`, `.eval`, `.losses`, `.gallery`,
`.vlm`, `.vqa`, `.tasks`. Variants are registered with timm when timm is already imported, or on
`lvface_mm.models.register_with_timm()`; then `timm.create_model("lvface_b")` works.
"""

from __future__ import annotations

from .lazy_exports import lazy_getattr
from .version import __version__

_LAZY = {
    "FaceViT": "lvface_mm.models",
    "FaceViTConfig": "lvface_mm.models",
    "create_model": "lvface_mm.models",
    "list_models": "lvface_mm.models",
    "FaceEmbedder": "lvface_mm.faces",
}

__all__ = ["FaceEmbedder", "FaceViT", "FaceViTConfig", "__version__", "create_model", "list_models"]


__getattr__ = lazy_getattr(__name__, _LAZY)
