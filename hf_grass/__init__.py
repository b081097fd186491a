"""hf_grass: which training documents made the model say this?

Per-example gradients compressed with FactGraSS inside the Hugging Face Trainer, cached on disk,
and influence scores for any prompt. The public names are imported lazily so that
``import hf_grass.compressors`` does not pull in transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hf_grass._version import __version__

_LAZY = {
    "GraSSConfig": "hf_grass.config",
    "GradientCache": "hf_grass.cache.reader",
    "GraSSCallback": "hf_grass.callbacks",
    "AttributionTrainer": "hf_grass.trainer",
    "AttributionMixin": "hf_grass.trainer",
    "find_influential": "hf_grass.query",
    "InfluenceResult": "hf_grass.results",
    "InfluentialDocument": "hf_grass.results",
}

__all__ = [
    "AttributionMixin",
    "AttributionTrainer",
    "GraSSCallback",
    "GraSSConfig",
    "GradientCache",
    "InfluenceResult",
    "InfluentialDocument",
    "__version__",
    "find_influential",
]

if TYPE_CHECKING:
    from hf_grass.cache.reader import GradientCache
    from hf_grass.callbacks import GraSSCallback
    from hf_grass.config import GraSSConfig
    from hf_grass.query import find_influential
    from hf_grass.results import InfluenceResult, InfluentialDocument
    from hf_grass.trainer import AttributionMixin, AttributionTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_grass' has no attribute {name!r}")
