"""Module targeting and hooks: per-example compressed gradients from a forward/backward."""

from hf_grass.capture.engine import BatchGradients, GradientComputer, NonFiniteError, unwrap_model
from hf_grass.capture.hooks import CaptureRequest, GradientCapture
from hf_grass.capture.loss import IGNORE_INDEX, per_example_loss
from hf_grass.capture.targets import TargetModule, find_target_modules

__all__ = [
    "IGNORE_INDEX",
    "BatchGradients",
    "CaptureRequest",
    "GradientCapture",
    "GradientComputer",
    "NonFiniteError",
    "TargetModule",
    "find_target_modules",
    "per_example_loss",
    "unwrap_model",
]
