"""The on-disk gradient cache, storage only: files, manifest, writer, reader, Hub transfer.

Nothing here computes gradients or statistics; the attribution pass (``hf_grass.attribution``)
writes through ``CacheWriter`` and everything else reads through ``GradientCache`` / ``open_cache``.
"""

from hf_grass.cache.files import CacheError
from hf_grass.cache.reader import GradientCache, open_cache

__all__ = ["CacheError", "GradientCache", "open_cache"]
