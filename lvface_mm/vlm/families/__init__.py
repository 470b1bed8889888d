"""VLM families: one file per model family, found by config class through a registry."""

from .base import (
    VLMFamily,
    family_for_config,
    family_for_model,
    get_family,
    list_families,
    register_family,
)

__all__ = ["VLMFamily", "family_for_config", "family_for_model", "get_family", "list_families", "register_family"]
