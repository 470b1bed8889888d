"""Training losses: margins, sharded Partial FC, and LVFace's Progressive Cluster Optimization."""

from ..distributed import gather_rows, slice_rows
from .margins import ArcFaceMargin, CombinedMargin, CosFaceMargin, Margin, create_margin, list_margins, register_margin
from .partial_fc import (
    PartialFC,
    PartialFCOutput,
    init_centres,
    margin_softmax_loss,
    target_and_negative_lse,
    target_values,
)
from .pco import STAGES, FeatureExpectationBank, PCOHead, two_anchor_loss
from .stage_scheduler import CosineStageScheduler

__all__ = [
    "STAGES",
    "ArcFaceMargin",
    "CombinedMargin",
    "CosFaceMargin",
    "CosineStageScheduler",
    "FeatureExpectationBank",
    "Margin",
    "PCOHead",
    "PartialFC",
    "PartialFCOutput",
    "create_margin",
    "gather_rows",
    "init_centres",
    "list_margins",
    "margin_softmax_loss",
    "register_margin",
    "slice_rows",
    "target_and_negative_lse",
    "target_values",
    "two_anchor_loss",
]
