"""Faces in pictures: detection, 5-point alignment and the FaceEmbedder pipeline."""

from .alignment import align_face, estimate_similarity, to_model_input

__all__ = ["align_face", "estimate_similarity", "to_model_input"]
