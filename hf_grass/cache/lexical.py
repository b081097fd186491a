"""A BM25 index of the cached documents' text (``bm25s``), stored inside the cache.

The lexical candidate stage: BM25 over the documents' text finds documents sharing words with the
prompt and its answer; the two-stage lookup then re-scores those candidates exactly with the
gradient rows (``hf_grass.scoring``), alone or joined with the FAISS index's candidates.

**Why stored, not built on the fly.** Building it reads every document (every ``shards/*.jsonl``):
for a pulled Hub cache that means downloading all of them, which a lazy pull of an indexed cache
otherwise avoids, and for 10^6 documents the tokenisation alone takes minutes. Stored, it is built
once, checksummed, pushed and pulled with the cache like the FAISS index.

**Storage.** ``bm25s.BM25.save`` writes a folder of ``.npy`` arrays and JSON (nothing pickled; loaded with
``allow_pickle=False``); it is written into ``index/.build-bm25/`` and renamed to
``index/bm25-<sha256[:12]>/`` once complete, then listed in the manifest under ``"lexical_index"``
with the sha256 of every file and the shards it was built from (a stale one is refused). The old
folder is deleted after the manifest names the new one. Row ``i`` of the BM25 corpus is the row
position ``i`` of the cache (documents are stored in row order).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_grass.cache.files import CacheError, FileLock, sha256_bytes, sha256_file
from hf_grass.cache.index import INDEX_DIR, shard_fingerprint, stale_reason, update_manifest
from hf_grass.cache.manifest import safe_path

logger = logging.getLogger("transformers.hf_grass")


def _bm25s() -> Any:
    try:
        import bm25s
    except ImportError as err:  # pragma: no cover - bm25s is a dependency
        raise ImportError("the lexical index needs bm25s: pip install bm25s") from err
    return bm25s


def _tokenize(texts: list[str], stopwords: str | None) -> list[list[str]]:
    return _bm25s().tokenize(texts, stopwords=stopwords, return_ids=False, show_progress=False)


@dataclass
class LexicalIndex:
    retriever: Any
    entry: dict[str, Any]

    def search(self, texts: list[str], n: int) -> torch.Tensor:
        """``[len(texts), n]`` int64 row positions of the best BM25 matches (``-1``: no match)."""
        n = min(n, int(self.entry["rows"]))
        out = torch.full((len(texts), n), -1, dtype=torch.int64)
        tokens = _tokenize(texts, self.entry["stopwords"])
        for i, query in enumerate(tokens):
            known = [t for t in query if t in self.retriever.vocab_dict]
            if not known:
                continue
            docs, scores = self.retriever.retrieve([known], k=n, show_progress=False, n_threads=0)
            keep = scores[0] > 0
            found = np.asarray(docs[0])[keep]
            out[i, : len(found)] = torch.from_numpy(found.astype(np.int64))
        return out


def build_lexical_index(
    cache: Any, *, rebuild: bool = False, stopwords: str | None = "en", k1: float = 1.5, b: float = 0.75
) -> dict[str, Any]:
    """Build the BM25 index of the documents; returns its manifest entry (see module docstring)."""
    bm25s = _bm25s()
    root = Path(cache.path)
    if not cache.manifest["complete"]:
        raise CacheError(f"{root} is an unfinished build; finish it before indexing")
    existing = cache.manifest.get("lexical_index")
    if existing and not rebuild and stale_reason(existing, cache.manifest, "BM25 index") is None:
        return existing
    (root / INDEX_DIR).mkdir(exist_ok=True)
    with FileLock(root / INDEX_DIR / ".lock"):
        texts = cache.document_store.texts()  # every row's text, in row order
        if not any(t.strip() for t in texts):
            raise ValueError(f"the documents of {root} have no text; there is nothing to index lexically")
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(_tokenize(texts, stopwords), show_progress=False)
        tmp = root / INDEX_DIR / ".build-bm25"
        shutil.rmtree(tmp, ignore_errors=True)
        retriever.save(tmp, show_progress=False)
        names = sorted(p.name for p in tmp.iterdir())
        digests = {name: sha256_file(tmp / name) for name in names}
        folder = f"{INDEX_DIR}/bm25-{sha256_bytes(json.dumps(digests, sort_keys=True).encode())[:12]}"
        for name in names:  # each file durable before the folder is renamed into place
            fd = os.open(tmp / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        shutil.rmtree(root / folder, ignore_errors=True)
        os.replace(tmp, root / folder)
        entry = {
            "engine": "bm25s",
            "bm25s_version": bm25s.__version__,
            "stopwords": stopwords,
            "k1": k1,
            "b": b,
            "rows": len(texts),
            "folder": folder,
            "files": [{"file": f"{folder}/{name}", "sha256": digests[name]} for name in names],
            "built_from": {
                "config_hash": cache.manifest["config_hash"],
                "dim": cache.manifest["dim"],
                "shards": shard_fingerprint(cache.manifest),
            },
        }
        old = update_manifest(cache, "lexical_index", entry)
        if old and old.get("folder") and old["folder"] != folder:
            shutil.rmtree(root / old["folder"], ignore_errors=True)
    logger.info("Built the BM25 index of %s (%d documents).", root, len(texts))
    return entry


def load_lexical_index(cache: Any) -> LexicalIndex | None:
    """The BM25 index (None if none is built), checked: every file's sha256, and not stale."""
    entry = cache.manifest.get("lexical_index")
    if not entry:
        return None
    reason = stale_reason(entry, cache.manifest, "BM25 index")
    if reason:
        raise CacheError(
            f"the BM25 index of {cache.path} is stale: {reason}. Rebuild it (hf-grass index "
            f"{cache.path} --bm25 --rebuild) or query without it."
        )
    for f in entry["files"]:
        path = safe_path(cache.path, f["file"])
        if not path.is_file() and getattr(cache, "remote", None) is not None:
            cache.remote.fetch([(f["file"], f["sha256"])])
        if not path.is_file() or sha256_file(path) != f["sha256"]:
            raise CacheError(
                f"the BM25 index file {path} is missing or does not match its sha256: rebuild it "
                f"(hf-grass index {cache.path} --bm25 --rebuild)"
            )
    retriever = _bm25s().BM25.load(safe_path(cache.path, entry["folder"]), allow_pickle=False)
    return LexicalIndex(retriever, entry)
