"""`CacheDocuments`: a cache's documents (``GradientCache.document_store``).

Each shard has a JSON-lines file beside it, one ``{"index", "text", "id"}`` record per row in row
order; the manifest's ``documents`` record says how the documents were encoded (the special tokens
they begin with, whether they were rendered by a chat template). A lazily pulled cache downloads a
document file when it is first read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_grass.cache.files import CacheError
from hf_grass.cache.manifest import safe_path

if TYPE_CHECKING:
    from hf_grass.cache.hub import RemoteFiles


class CacheDocuments:
    """The documents of one cache and how they were encoded (reached as ``cache.document_store``).

    Args:
        path: the cache directory.
        manifest: its validated manifest.
        remote: the Hub files of a lazily pulled cache, whose document files are downloaded when read.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], remote: RemoteFiles | None = None):
        self.path = path
        self.shards: list[dict[str, Any]] = manifest["shards"]
        self._encoding = manifest.get("documents")
        self.remote = remote

    @property
    def prefix(self) -> list[int] | None:
        """The special token ids every cached document begins with (``<eos>`` or ``<bos>`` first,
        as many pretraining pipelines do); ``None`` when unknown (a cache built without a tokenizer)."""
        return self._encoding.get("prefix") if isinstance(self._encoding, dict) else None

    @property
    def chat(self) -> bool:
        """Whether the documents begin the way the tokenizer's chat template begins a conversation."""
        return bool(self._encoding.get("chat_template")) if isinstance(self._encoding, dict) else False

    @property
    def skipped(self) -> list[int]:
        """The dataset indices the pass skipped (examples with no supervised token), in shard order."""
        return [i for s in self.shards for i in s["skipped"]]

    def read(self, indices: list[int] | None = None) -> dict[int, dict[str, Any]]:
        """``{index: {"index", "text", "id"}}`` for the given dataset indices (all when None)."""
        wanted = None if indices is None else set(int(i) for i in indices)
        out: dict[int, dict[str, Any]] = {}
        for pos, shard in enumerate(self.shards):
            first, last = shard.get("first_index"), shard.get("last_index")
            if wanted is not None and (first is None or not any(first <= i <= last for i in wanted)):
                continue
            for doc in self._records(pos):
                if wanted is None or doc["index"] in wanted:
                    out[doc["index"]] = doc
        return out

    def texts(self) -> list[str]:
        """Every row's document text, in row order ('' where none was stored)."""
        texts: list[str] = []
        for pos, shard in enumerate(self.shards):
            lines = [doc.get("text") or "" for doc in self._records(pos)]
            if len(lines) != shard["rows"]:
                path = safe_path(self.path, shard["docs"])
                raise CacheError(f"{path} holds {len(lines)} documents for {shard['rows']} rows (shard {pos})")
            texts += lines
        return texts

    def _records(self, pos: int) -> Iterator[dict[str, Any]]:
        """The records of shard ``pos``'s document file, in row order (downloaded first if lazy)."""
        shard = self.shards[pos]
        path = safe_path(self.path, shard["docs"])
        if self.remote is not None and not path.is_file():
            self.remote.fetch([(shard["docs"], shard["docs_sha256"])])
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)
