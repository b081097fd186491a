"""`CacheIndexes`: a cache's optional search indexes (``GradientCache.indexes``).

The FAISS index of the rows (``hf_grass.cache.index``, built by ``hf_grass.cache.index_build``) and
the BM25 index of the documents' text (``hf_grass.cache.lexical``). Each is loaded once, when first
asked for, and checked then (sha256, not stale); building one replaces the loaded copy. A missing
or damaged index leaves the exact scan working: opening a cache never reads the index files.
"""

from __future__ import annotations

from typing import Any

from hf_grass.cache import index_build, lexical
from hf_grass.cache.index import FaissIndex, load_index
from hf_grass.cache.lexical import LexicalIndex


class CacheIndexes:
    """The FAISS and BM25 indexes of one cache (reached as ``cache.indexes``).

    Args:
        cache: the ``GradientCache`` the indexes belong to (the build and load functions read its
            manifest, rows and documents, and record a built index in its manifest).
    """

    def __init__(self, cache: Any):
        self._cache = cache
        # each index once loaded (None, once loaded, says that none is built)
        self._faiss: FaissIndex | None = None
        self._faiss_loaded = False
        self._bm25: LexicalIndex | None = None
        self._bm25_loaded = False

    def build_faiss(self, kind: str = "auto", **kwargs: Any) -> dict[str, Any]:
        """Build (or resume building) the FAISS index of the rows, stored in the cache; returns its
        manifest entry. ``kwargs``: the fields of ``hf_grass.cache.index.IndexSettings`` and the
        options of ``hf_grass.cache.index_build.build_index`` (``rebuild``, ``threads``, ...)."""
        entry = index_build.build_index(self._cache, kind, **kwargs)
        self._faiss, self._faiss_loaded = None, False
        return entry

    def faiss(self) -> FaissIndex | None:
        """The FAISS index (loaded once, checked: sha256 and not stale), or None if none is built."""
        if not self._faiss_loaded:
            self._faiss, self._faiss_loaded = load_index(self._cache), True
        return self._faiss

    def build_lexical(self, **kwargs: Any) -> dict[str, Any]:
        """Build the BM25 index of the documents' text, stored in the cache (``cache/lexical.py``);
        returns its manifest entry. ``kwargs``: those of ``hf_grass.cache.lexical.build_lexical_index``."""
        entry = lexical.build_lexical_index(self._cache, **kwargs)
        self._bm25, self._bm25_loaded = None, False
        return entry

    def lexical(self) -> LexicalIndex | None:
        """The BM25 index (``hf_grass.cache.lexical.LexicalIndex``), or None if none is built."""
        if not self._bm25_loaded:
            self._bm25, self._bm25_loaded = lexical.load_lexical_index(self._cache), True
        return self._bm25
