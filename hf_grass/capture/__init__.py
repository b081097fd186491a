"""Module targeting and hooks: per-example compressed gradients from a forward/backward."""

from hf_grass.capture.engine import BatchGradients, GradientComputer, NonFiniteError, unwrap_model
from hf_grass.capture.fingerprint import model_fingerprint, weights_fingerprint
from hf_grass.capture.hooks import CaptureError, CaptureRequest, GradientCapture
from hf_grass.capture.loss import per_example_loss
from hf_grass.capture.targets import TargetModule, find_target_modules
from hf_grass.data import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "BatchGradients",
    "CaptureError",
    "CaptureRequest",
    "GradientCapture",
    "GradientComputer",
    "NonFiniteError",
    "TargetModule",
    "find_target_modules",
    "model_fingerprint",
    "per_example_loss",
    "unwrap_model",
    "weights_fingerprint",
]
