"""lvface-mm: LVFace face encoders as identity encoders for vision-language models.

Heavy optional parts (VLM bridge, gallery, training losses) are imported from their subpackages:
`lvface_mm.vlm`, `lvface_mm.gallery`, `lvface_mm.losses`, `lvface_mm.data`, `lvface_mm.eval`.
"""

from .models import FaceViT, FaceViTConfig, create_model, list_models
from .version import __version__

__all__ = ["FaceViT", "FaceViTConfig", "__version__", "create_model", "list_models"]
