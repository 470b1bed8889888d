"""Identity bridge: LVFace as an identity encoder for Hugging Face VLMs and LLMs.

Needs the `vlm` extra (`pip install "lvface-mm[vlm]"`: transformers 5.x, peft, accelerate).

Main entry points:
    IdentityVLM.from_pretrained(base_model, adapter=..., encoder=...)    caption / ask / generate
    IdentityAdapter.from_pretrained / save_pretrained / push_to_hub        adapters on the Hub (`hub`)
    IdentityAdapterConfig, load_adapter_card, list_adapter_cards             adapter cards
    create_projector, list_projectors                                        projectors
    IdentityInjector, IdentityTokens, inject_identity_tokens                 injection
    ground_faces, grounded_messages, render_grounded_prompt                  prompt grounding

Tiny random models for tests and `--tiny` demos live in `lvface_mm.vlm.testing` (imported from
there explicitly; nothing in the library imports it).
"""

try:
    import transformers as _transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        'lvface_mm.vlm needs transformers (>=5), peft and accelerate: pip install "lvface-mm[vlm]"'
    ) from err

from .adapter import IdentityAdapter
from .config import (
    IdentityAdapterConfig,
    add_card_dir,
    default_card_dir,
    list_adapter_cards,
    load_adapter_card,
)
from .families import VLMFamily, family_for_config, family_for_model, get_family, list_families, register_family
from .grounding import GroundingTemplate, ground_faces, grounded_messages, grounding_text, render_grounded_prompt
from .hub import resolve_adapter
from .injection import FaceCountError, IdentityInjector, IdentityTokens, inject_identity_tokens
from .model import AnswerStream, IdentityVLM, ModelChanges
from .processing import IdentityInputs, IdentityProcessor, expand_face_placeholders
from .projectors import FaceFeatures, Projector, ProjectorSpec, create_projector, list_projectors, register_projector
from .results import GroundedFace, IdentityAnswer, NameMention, find_mentions

__all__ = [
    "AnswerStream",
    "FaceCountError",
    "FaceFeatures",
    "GroundedFace",
    "GroundingTemplate",
    "IdentityAdapter",
    "IdentityAdapterConfig",
    "IdentityAnswer",
    "IdentityInjector",
    "IdentityInputs",
    "IdentityProcessor",
    "IdentityTokens",
    "IdentityVLM",
    "ModelChanges",
    "NameMention",
    "Projector",
    "ProjectorSpec",
    "VLMFamily",
    "add_card_dir",
    "create_projector",
    "default_card_dir",
    "expand_face_placeholders",
    "family_for_config",
    "family_for_model",
    "find_mentions",
    "get_family",
    "ground_faces",
    "grounded_messages",
    "grounding_text",
    "inject_identity_tokens",
    "list_adapter_cards",
    "list_families",
    "list_projectors",
    "load_adapter_card",
    "register_family",
    "register_projector",
    "render_grounded_prompt",
    "resolve_adapter",
]
