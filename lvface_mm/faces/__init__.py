"""Faces in pictures: loading, detection, 5-point alignment and the FaceEmbedder pipeline.

Importing this package is cheap: detector backends import dlib / onnxruntime when first created.
"""

from .alignment import align_face, estimate_similarity, to_model_input
from .detection import (
    DetectedFace,
    Detector,
    create_detector,
    detector_info,
    list_detectors,
    nms,
    register_detector,
)
from .dlib_detector import DlibDetector
from .embedder import Face, FaceEmbedder, ImageResult, PipelineConfig
from .image_io import DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, LoadedImage, load_image
from .onnx_detector import OnnxFaceDetector
from .retinaface import RetinaFaceConfig, RetinaFaceDetector
from .screening import DLIB_DEFAULT_SCORE_THRESHOLD, LandmarkCheck, screen_faces
from .scrfd import SCRFDDetector

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DLIB_DEFAULT_SCORE_THRESHOLD",
    "DetectedFace",
    "Detector",
    "DlibDetector",
    "Face",
    "FaceEmbedder",
    "ImageLoadError",
    "ImageResult",
    "LandmarkCheck",
    "LoadedImage",
    "OnnxFaceDetector",
    "PipelineConfig",
    "RetinaFaceConfig",
    "RetinaFaceDetector",
    "SCRFDDetector",
    "align_face",
    "create_detector",
    "detector_info",
    "estimate_similarity",
    "list_detectors",
    "load_image",
    "nms",
    "register_detector",
    "screen_faces",
    "to_model_input",
]
