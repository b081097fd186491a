"""The on-disk gradient cache: writer, reader, manifest, Hub push/pull."""

from hf_grass.cache.build import Distributed, build_cache, model_fingerprint
from hf_grass.cache.files import CacheError
from hf_grass.cache.reader import GradientCache

__all__ = ["CacheError", "Distributed", "GradientCache", "build_cache", "model_fingerprint"]
