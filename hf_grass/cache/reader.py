"""`GradientCache`: read a cache directory memory-mapped, shard by shard, and `open_cache`.

Opening validates the manifest (schema, sizes, paths inside the directory) and each shard's header
and size before any array is read; ``verify()`` also checks every file's sha256 first. The indexes
are optional: an open (``verify=True`` included) does not check their files, which are checked when
an index is loaded, so a missing or damaged index leaves the exact scan working; ``verify()`` called
on its own checks them too. ``open_cache``
(and ``GradientCache.from_pretrained``, the same function) opens a local folder or a Hub repo id and
verifies both the same way. Nothing is unpickled.

A verification is remembered in ``.verified.json`` beside the manifest: the size, mtime, ctime and
inode of each file whose sha256 matched. A later open re-hashes only the files whose stat changed
since (any write changes ctime, which user code cannot set back), so opening a large cache again
costs a ``stat`` per file; ``verify(full=True)`` re-hashes everything.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from hf_grass.cache import hub, index_build, lexical
from hf_grass.cache import index as faiss_index
from hf_grass.cache import rows as row_io
from hf_grass.cache.files import CacheError, mmap_tensors, read_header
from hf_grass.cache.manifest import MANIFEST, load_json, safe_path, validate_manifest
from hf_grass.cache.rows import RowBlock, StoredShard
from hf_grass.cache.verification import verify_files
from hf_grass.config import GraSSConfig

logger = logging.getLogger("transformers.hf_grass")


class GradientCache:
    """A gradient cache on disk.

    Args:
        path: the cache directory.
        verify: also check the sha256 of every data file now (files unchanged since an earlier
            verification are not hashed again; sizes and headers are always checked). The index
            files are checked when an index is loaded.
        source: how to name the cache in messages (a Hub download names its repo and revision).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        verify: bool = False,
        source: str | None = None,
        remote: hub.RemoteFiles | None = None,
    ):
        self.path = Path(path)
        self.source = source
        # a lazily pulled Hub cache: shard files are downloaded (and checked) when first read
        self.remote = remote
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = (
                " (an unfinished multi-process build: run it again to finish)"
                if (self.path / "parts").is_dir()
                else ""
            )
            raise FileNotFoundError(f"no gradient cache at {self.path}: {manifest_path} does not exist{hint}")
        self.manifest: dict[str, Any] = validate_manifest(load_json(manifest_path), self.path)
        self.config = GraSSConfig.from_dict(self.manifest["config"])
        self._shard_paths = [safe_path(self.path, s["file"]) for s in self.shards]
        self._checked = [False] * len(self.shards)  # headers checked (a lazy cache: once fetched)
        counts = torch.tensor([0] + [s["rows"] for s in self.shards], dtype=torch.int64)
        self.row_offsets = counts.cumsum(0)  # first row position of each shard, then num_rows
        if verify:  # checksums first: nothing of an unverified file is parsed
            self.verify(indexes=False)
        for pos, (shard, shard_path) in enumerate(zip(self.shards, self._shard_paths)):
            if self.remote is not None and not shard_path.is_file():
                continue  # fetched (and checked) when first read
            self._checked[pos] = self._check_shard_header(shard, shard_path)
        if not self.manifest["complete"]:
            logger.warning("Gradient cache %s is incomplete (%d rows so far).", self.path, self.num_rows)

    # ---- description ----------------------------------------------------------------------------

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def num_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def __len__(self) -> int:
        return self.num_rows

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def dtype(self) -> torch.dtype:
        return self.config.torch_dtype

    @property
    def modules(self) -> list[dict[str, Any]]:
        return self.manifest["modules"]

    @property
    def module_names(self) -> list[str]:
        return [m["name"] for m in self.modules]

    @property
    def model_info(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def document_prefix(self) -> list[int] | None:
        """The special token ids every cached document begins with (``<eos>`` or ``<bos>`` first,
        as many pretraining pipelines do); ``None`` when unknown (a cache built without a tokenizer)."""
        documents = self.manifest.get("documents")
        return documents.get("prefix") if isinstance(documents, dict) else None

    @property
    def chat_documents(self) -> bool:
        """Whether the documents begin the way the tokenizer's chat template begins a conversation."""
        documents = self.manifest.get("documents")
        return bool(documents.get("chat_template")) if isinstance(documents, dict) else False

    @property
    def skipped(self) -> list[int]:
        return [i for s in self.shards for i in s["skipped"]]

    def summary(self) -> dict[str, Any]:
        size = (
            sum(p.stat().st_size for p, _ in self.files() if p.is_file())
            + (self.path / MANIFEST).stat().st_size
        )
        return {
            "path": str(self.path),
            "rows": self.num_rows,
            "examples": self.manifest["num_examples"],
            "skipped": len(self.skipped),
            "truncated": sum(s.get("truncated", 0) for s in self.shards),
            "complete": self.manifest["complete"],
            "compressor": self.config.compressor,
            "layout": self.manifest["layout"],
            "proj_dim": self.config.proj_dim,
            "total_dim": self.config.total_dim,
            "modules": len(self.modules),
            "dim": self.dim,
            "dtype": self.config.dtype,
            "preconditioner": self.config.preconditioner,
            "seed": self.config.seed,
            "shards": len(self.shards),
            "bytes": size,
            "model": self.model_info,
        }

    def __repr__(self) -> str:
        return (
            f"GradientCache({str(self.path)!r}, rows={self.num_rows}, dim={self.dim}, "
            f"compressor={self.config.compressor!r}, dtype={self.config.dtype})"
        )

    # ---- integrity ------------------------------------------------------------------------------

    def _check_shard_header(self, shard: dict[str, Any], path: Path) -> bool:
        if not path.is_file():
            raise CacheError(
                f"shard file {path} is missing; rebuild shard {shard['id']}: run the same build command on "
                "this cache again, it recomputes missing or damaged shards"
            )
        header, _ = read_header(path)
        grads, indices = header.get("grads"), header.get("indices")
        if grads is None or indices is None:
            raise CacheError(f"{path} lacks the 'grads' or 'indices' tensor; rebuild shard {shard['id']}")
        expected_dtype = {"int8": "I8", "float16": "F16", "bfloat16": "BF16", "float32": "F32"}[
            self.manifest["dtype"]
        ]
        if grads["shape"] != [shard["rows"], self.dim] or grads["dtype"] != expected_dtype:
            raise CacheError(
                f"{path} holds {grads['dtype']}{grads['shape']}, but the manifest says "
                f"{expected_dtype}[{shard['rows']}, {self.dim}]; rebuild shard {shard['id']}"
            )
        if indices["shape"] != [shard["rows"]] or indices["dtype"] != "I64":
            raise CacheError(f"{path} has an invalid 'indices' tensor; rebuild shard {shard['id']}")
        scales = header.get("scales")
        if (expected_dtype == "I8") != (scales is not None) or (
            scales is not None and (scales["shape"] != [shard["rows"]] or scales["dtype"] != "F32")
        ):
            raise CacheError(f"{path} has a missing or invalid 'scales' tensor; rebuild shard {shard['id']}")
        norms = header.get("norms")
        if norms is None or norms["shape"] != [shard["rows"], 2] or norms["dtype"] != "F32":
            raise CacheError(f"{path} has a missing or invalid 'norms' tensor; rebuild shard {shard['id']}")
        return True

    def files(self, indexes: bool = True) -> list[tuple[Path, str]]:
        """Every file with its expected sha256 (``indexes=False``: without the optional index files)."""
        out = []
        for shard, path in zip(self.shards, self._shard_paths):
            out.append((path, shard["sha256"]))
            out.append((safe_path(self.path, shard["docs"]), shard["docs_sha256"]))
        for entry in self.manifest["stats"]:
            out.append((safe_path(self.path, entry["file"]), entry["sha256"]))
        if self.manifest.get("eigenbasis"):
            entry = self.manifest["eigenbasis"]
            out.append((safe_path(self.path, entry["file"]), entry["sha256"]))
        if indexes:
            for entry in faiss_index.index_files(self.manifest):  # the FAISS and BM25 indexes, if built
                out.append((safe_path(self.path, entry["file"]), entry["sha256"]))
        return out

    def verify(self, full: bool = False, remember: bool = True, indexes: bool = True) -> None:
        """Check every file against its sha256; raises ``CacheError`` naming the first bad file.

        Files whose size, mtime, ctime and inode match a recorded earlier verification are not
        hashed again, unless ``full``. With ``remember`` the result is recorded for the next time
        (``hf_grass.cache.verification``). ``indexes=False``: the data files only (what opening a
        cache checks; the optional index files are checked when loaded).
        """

        def not_fetched(rel: str, path: Path) -> bool:  # a lazy pull checks a file when it fetches it
            return self.remote is not None and not path.is_file() and self.remote.lazy(rel)

        files = self.files(indexes=indexes)
        verify_files(self.path, files, self.source, full=full, remember=remember, skip=not_fetched)

    # ---- data -----------------------------------------------------------------------------------

    def iter_stored(self, shards: list[int] | None = None) -> Iterator[StoredShard]:
        """One ``StoredShard`` per shard (``shards``: only these positions), memory-mapped, as
        stored: a row is ``grads * scale`` for int8 caches, ``grads`` otherwise (convert with
        ``hf_grass.cache.rows.rows_to_float32``, or read ``iter_row_blocks``)."""
        for pos in range(len(self.shards)) if shards is None else shards:
            t = mmap_tensors(self._local_shard(pos))
            yield StoredShard(t["indices"], t["grads"], t.get("scales"), t.get("norms"))

    def iter_shards(self, shards: list[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields ``(indices [rows] int64, grads [rows, dim])`` per shard: memory-mapped, or, for int8
        caches, decoded to float32 one shard at a time. ``shards``: only these positions."""
        for shard in self.iter_stored(shards):
            yield shard.indices, shard.rows()

    def iter_row_blocks(self, rows_per_block: int, shards: list[int] | None = None) -> Iterator[RowBlock]:
        """Float32 rows in blocks of at most ``rows_per_block`` (never spanning shards), in row order.

        Each block's ``rows`` is one reused buffer, valid until the next block: copy what you keep.
        ``shards``: only these shard positions (e.g. one rank's share).
        """
        order = list(range(len(self.shards))) if shards is None else list(shards)
        stream = (
            (int(self.row_offsets[pos]), shard.indices, shard.stored())
            for pos, shard in zip(order, self.iter_stored(order))
        )
        return row_io.iter_blocks(stream, rows_per_block, self.dim)

    def rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        """``[n, dim]`` float32 rows at these row positions (see ``hf_grass.cache.rows``): reads only
        those rows (a lazily pulled cache downloads only the shards holding them)."""
        return row_io.gather_rows(self._mapped, self.row_offsets, positions, self.dim)

    def stored_at(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows at these positions as stored (``grads``, and ``scales`` / ``norms`` when
        present; decode blocks of them with ``hf_grass.cache.rows.rows_to_float32``): one byte a
        number for int8 rows, where ``rows_at`` makes four."""
        return row_io.gather_stored(self._mapped, self.row_offsets, positions)

    def norms_at(self, positions: torch.Tensor) -> torch.Tensor:
        """``[n, 2]`` float32: the exact gradient and preconditioned norms of the rows at these
        positions (stored by the pass; for unit-normalised scores)."""
        return row_io.gather_rows(self._mapped, self.row_offsets, positions, 2, key="norms")

    def _mapped(self, pos: int) -> dict[str, torch.Tensor]:
        """The memory-mapped tensors of shard ``pos``, kept open (up to 256 shards, least recently
        used closed first) so that gathering scattered rows costs no re-open per query."""
        maps = self.__dict__.setdefault("_maps", OrderedDict())
        if pos in maps:
            maps.move_to_end(pos)
        else:
            maps[pos] = mmap_tensors(self._local_shard(pos))
            if len(maps) > 256:
                maps.popitem(last=False)
        return maps[pos]

    def _local_shard(self, pos: int) -> Path:
        """The shard file at position ``pos``, downloaded first if this is a lazy Hub cache."""
        path = self._shard_paths[pos]
        if not self._checked[pos]:
            if self.remote is not None:
                shard = self.shards[pos]
                self.remote.fetch([(shard["file"], shard["sha256"]), (shard["docs"], shard["docs_sha256"])])
            self._checked[pos] = self._check_shard_header(self.shards[pos], path)
        return path

    @cached_property
    def indices(self) -> torch.Tensor:
        """Dataset index of every row, in row order."""
        parts = [self._shard_indices(pos) for pos in range(len(self.shards))]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def _shard_indices(self, pos: int) -> torch.Tensor:
        if not self._checked[pos]:  # not downloaded (lazy): from the manifest if it tells
            out = row_io.indices_from_manifest(self.shards[pos])
            if out is not None:
                return out
        return mmap_tensors(self._local_shard(pos))["indices"].clone()

    def load(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows in memory (small caches and tests): ``[num_rows, dim]``."""
        blocks = [row_io.rows_to_float32({"grads": grads}).to(dtype) for _, grads in self.iter_shards()]
        return torch.cat(blocks) if blocks else torch.empty(0, self.dim, dtype=dtype)

    def module_slice(self, name: str) -> slice:
        for m in self.modules:
            if m["name"] == name:
                return slice(m["offset"], m["offset"] + m["dim"])
        raise KeyError(f"module {name!r} is not in this cache; it has {self.module_names[:10]}...")

    def documents(self, indices: list[int] | None = None) -> dict[int, dict[str, Any]]:
        """``{index: {"index", "text", "id"}}`` for the given dataset indices (all when None)."""
        wanted = None if indices is None else set(int(i) for i in indices)
        out: dict[int, dict[str, Any]] = {}
        for shard in self.shards:
            first, last = shard.get("first_index"), shard.get("last_index")
            if wanted is not None and (first is None or not any(first <= i <= last for i in wanted)):
                continue
            docs_path = safe_path(self.path, shard["docs"])
            if self.remote is not None and not docs_path.is_file():
                self.remote.fetch([(shard["docs"], shard["docs_sha256"])])
            with open(docs_path, encoding="utf-8") as fh:
                for line in fh:
                    doc = json.loads(line)
                    if wanted is None or doc["index"] in wanted:
                        out[doc["index"]] = doc
        return out

    def statistics(self) -> dict[str, torch.Tensor]:
        """The preconditioner sums, added over the writer processes (float64)."""
        total: dict[str, torch.Tensor] = {}
        for entry in self.manifest["stats"]:
            for key, value in mmap_tensors(safe_path(self.path, entry["file"])).items():
                total[key] = total[key] + value if key in total else value.clone()
        return total

    def eigenbasis(self) -> dict[str, torch.Tensor] | None:
        entry = self.manifest.get("eigenbasis")
        if not entry:
            return None
        return {k: v.clone() for k, v in mmap_tensors(safe_path(self.path, entry["file"])).items()}

    # ---- indexes --------------------------------------------------------------------------------

    def build_index(self, kind: str = "auto", **kwargs: Any) -> dict[str, Any]:
        """Build (or resume building) the FAISS index of the rows, stored in the cache; returns its
        manifest entry. ``kwargs``: the fields of ``hf_grass.cache.index.IndexSettings`` and the
        options of ``hf_grass.cache.index_build.build_index`` (``rebuild``, ``threads``, ...)."""
        entry = index_build.build_index(self, kind, **kwargs)
        self.__dict__.pop("_faiss", None)
        return entry

    def index(self) -> faiss_index.FaissIndex | None:
        """The FAISS index (loaded once, checked: sha256 and not stale), or None if none is built."""
        if "_faiss" not in self.__dict__:
            self.__dict__["_faiss"] = faiss_index.load_index(self)
        return self.__dict__["_faiss"]

    def build_lexical_index(self, **kwargs: Any) -> dict[str, Any]:
        """Build the BM25 index of the documents' text, stored in the cache (``cache/lexical.py``)."""
        entry = lexical.build_lexical_index(self, **kwargs)
        self.__dict__.pop("_bm25", None)
        return entry

    def lexical_index(self) -> Any:
        """The BM25 index (``hf_grass.cache.lexical.LexicalIndex``), or None if none is built."""
        if "_bm25" not in self.__dict__:
            self.__dict__["_bm25"] = lexical.load_lexical_index(self)
        return self.__dict__["_bm25"]

    # ---- Hub ------------------------------------------------------------------------------------

    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        endpoint: str | None = None,
        large: bool = False,
    ) -> str:
        """Upload this cache, with a dataset card, to a Hugging Face *dataset* repo in one commit.

        Returns the commit, a ``huggingface_hub.CommitInfo``: the commit URL as a ``str``, with the
        commit id in ``.oid``. See ``hf_grass.cache.hub`` for what is uploaded. ``large``: upload the
        data in several resumable commits, the manifest last (``hub.push_folder``).
        """
        if not self.manifest["complete"]:
            raise CacheError(
                f"{self.path} is an unfinished build ({self.num_rows} of {self.manifest['num_examples']} "
                "rows); run the build again to finish it before pushing."
            )
        if self.remote is not None and not all(path.is_file() for path, _ in self.files()):
            raise CacheError(f"{self.path} is a lazy pull, not all of it is here; pull it with lazy=False to push")
        # never publish a damaged cache: every file must match its sha256 (and pushing writes nothing here)
        self.verify(full=True, remember=False)
        target = hub.PushTarget(repo_id, private, token, revision, commit_message, endpoint, large)
        return hub.push_folder(self.path, self.manifest, [path for path, _ in self.files()], target)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        revision: str | None = None,
        *,
        token: str | None = None,
        endpoint: str | None = None,
        local_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        verify: bool = True,
        lazy: bool = False,
    ) -> GradientCache:
        """``open_cache``: a local cache directory, or a Hub repo downloaded; verified either way."""
        return open_cache(
            repo_id_or_path,
            revision=revision,
            token=token,
            endpoint=endpoint,
            local_dir=local_dir,
            force_download=force_download,
            verify=verify,
            lazy=lazy,
        )


def open_cache(
    spec: GradientCache | str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    local_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    verify: bool = True,
    lazy: bool = False,
) -> GradientCache:
    """The one way to open a cache: a ``GradientCache`` as it is, a local directory, or a Hub dataset
    repo id (downloaded first, see ``hf_grass.cache.hub``).

    Both kinds are checked the same way before any array is read: the manifest's schema and paths,
    then (with ``verify``) the sha256 of every file it lists (files unchanged since their last
    verification are not hashed again), then the sizes and safetensors headers of the shards.

    Args:
        spec: a cache, a path, or a repo id ``namespace/name``. A string is a path if it exists or
            does not read as ``namespace/name`` (``hf_grass.cache.hub.is_local``).
        revision: branch, tag or commit of the repo (default ``main``).
        token: for private repos (default: the saved login or ``HF_TOKEN``).
        endpoint: the Hub (default: ``HF_ENDPOINT``, else huggingface.co).
        local_dir: where to download to (default: ``hub.default_local_dir``).
        force_download: download every file again even if the local copy is current.
        verify: check every file's sha256 (``False``: sizes and headers only, e.g. to describe a
            damaged cache).
        lazy: (Hub only) download the shards only when a read needs them; with an index, a query
            then fetches only the shards holding its candidates.
    """
    if isinstance(spec, GradientCache):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"cache must be a GradientCache, a path or a Hub repo id; got {type(spec).__name__}")
    text = os.fspath(spec)
    if hub.is_local(spec):
        if revision is not None or lazy:
            raise ValueError(f"revision and lazy apply to Hub repos; {text} is a local path")
        return GradientCache(text, verify=verify)
    folder, remote = hub.download(
        text,
        revision=revision,
        token=token,
        endpoint=endpoint,
        local_dir=local_dir,
        force_download=force_download,
        lazy=lazy,
    )
    source = f"{text}@{revision or 'main'}"
    if not (folder / MANIFEST).is_file():
        raise CacheError(f"{source} is not an hf-grass gradient cache: it has no {MANIFEST}")
    return GradientCache(folder, verify=verify, source=source, remote=remote)
