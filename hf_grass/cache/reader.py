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

import logging
import os
from pathlib import Path
from typing import Any

import torch

from hf_grass.cache import hub
from hf_grass.cache.files import CacheError, mmap_tensors
from hf_grass.cache.index import FaissIndex, index_files
from hf_grass.cache.manifest import MANIFEST, load_json, safe_path, validate_manifest
from hf_grass.cache.reader_documents import CacheDocuments
from hf_grass.cache.reader_indexes import CacheIndexes
from hf_grass.cache.reader_rows import CacheRows
from hf_grass.cache.verification import verify_files
from hf_grass.config import GraSSConfig

logger = logging.getLogger("transformers.hf_grass")


class GradientCache:
    """A gradient cache on disk: what it holds, its integrity, and the reads most callers make.

    The work is done by parts, one job each: ``rows`` (``CacheRows``: the shard files, row
    iterators and gathers), ``document_store`` (``CacheDocuments``: the documents and how they were
    encoded), ``indexes`` (``CacheIndexes``: the FAISS and BM25 indexes); ``push_to_hub`` goes
    through ``hf_grass.cache.hub``.

    Args:
        path: the cache directory.
        verify: also check the sha256 of every data file now (files unchanged since an earlier
            verification are not hashed again; sizes and headers are always checked). The index
            files are checked when an index is loaded.
        source: how to name the cache in messages (a Hub download names its repo and revision).
        remote: the Hub files of a lazily pulled cache (``open_cache(..., lazy=True)``).

    Attributes:
        manifest: the validated ``manifest.json``.
        config: the ``GraSSConfig`` the cache was built with.
        shards: the manifest's shard records, in row order.
        num_rows: the number of rows (``len(cache)``).
        dim: the width of a row.
        dtype: the storage dtype of the rows.
        modules: the manifest's module records (``name``, ``offset``, ``dim``, ...), in row order.
        module_names: the names of those modules.
        model_info: the manifest's record of the model the rows were computed from.
        rows: the rows (``CacheRows``): ``iter_row_blocks``, ``iter_shards``, ``iter_stored``,
            ``rows_at``, ``stored_at``, ``norms_at``, ``indices``, ``load``.
        document_store: the documents (``CacheDocuments``): ``read``, ``texts``, ``prefix``, ``chat``,
            ``skipped``.
        indexes: the indexes (``CacheIndexes``): ``build_faiss``, ``faiss``, ``build_lexical``, ``lexical``.
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
        # the description: fixed once the manifest is validated (building an index adds its own entry)
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self.num_rows: int = sum(s["rows"] for s in self.shards)
        self.dim: int = self.manifest["dim"]
        self.dtype: torch.dtype = self.config.torch_dtype
        self.modules: list[dict[str, Any]] = self.manifest["modules"]
        self.module_names: list[str] = [m["name"] for m in self.modules]
        self.model_info: dict[str, Any] = self.manifest["model"]
        self.rows = CacheRows(self.path, self.manifest, remote)
        self.document_store = CacheDocuments(self.path, self.manifest, remote)
        self.indexes = CacheIndexes(self)
        if verify:  # checksums first: nothing of an unverified file is parsed
            self.verify(indexes=False)
        self.rows.check_headers()
        if not self.manifest["complete"]:
            logger.warning("Gradient cache %s is incomplete (%d rows so far).", self.path, self.num_rows)

    # ---- description ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_rows

    def module_slice(self, name: str) -> slice:
        """The columns of a row that hold module ``name``."""
        for m in self.modules:
            if m["name"] == name:
                return slice(m["offset"], m["offset"] + m["dim"])
        raise KeyError(f"module {name!r} is not in this cache; it has {self.module_names[:10]}...")

    def summary(self) -> dict[str, Any]:
        """What ``hf-grass info`` prints: sizes, build settings, the model."""
        size = (
            sum(p.stat().st_size for p, _ in self.files() if p.is_file())
            + (self.path / MANIFEST).stat().st_size
        )
        return {
            "path": str(self.path),
            "rows": self.num_rows,
            "examples": self.manifest["num_examples"],
            "skipped": len(self.document_store.skipped),
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

    def files(self, indexes: bool = True) -> list[tuple[Path, str]]:
        """Every file with its expected sha256 (``indexes=False``: without the optional index files)."""
        out = []
        for shard, path in zip(self.shards, self.rows.paths):
            out.append((path, shard["sha256"]))
            out.append((safe_path(self.path, shard["docs"]), shard["docs_sha256"]))
        for entry in self.manifest["stats"]:
            out.append((safe_path(self.path, entry["file"]), entry["sha256"]))
        if self.manifest.get("eigenbasis"):
            entry = self.manifest["eigenbasis"]
            out.append((safe_path(self.path, entry["file"]), entry["sha256"]))
        if indexes:
            for entry in index_files(self.manifest):  # the FAISS and BM25 indexes, if built
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

    # ---- data (the common reads; the rest is in ``rows`` and ``document_store``) -----------------

    @property
    def indices(self) -> torch.Tensor:
        """Dataset index of every row, in row order (``rows.indices``)."""
        return self.rows.indices

    def load(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows in memory (small caches and tests): ``[num_rows, dim]`` (``rows.load``)."""
        return self.rows.load(dtype)

    def documents(self, indices: list[int] | None = None) -> dict[int, dict[str, Any]]:
        """``{index: {"index", "text", "id"}}`` for the given dataset indices (all when None)."""
        return self.document_store.read(indices)

    def statistics(self) -> dict[str, torch.Tensor]:
        """The preconditioner sums, added over the writer processes (float64)."""
        total: dict[str, torch.Tensor] = {}
        for entry in self.manifest["stats"]:
            for key, value in mmap_tensors(safe_path(self.path, entry["file"])).items():
                total[key] = total[key] + value if key in total else value.clone()
        return total

    def eigenbasis(self) -> dict[str, torch.Tensor] | None:
        """The warm-up eigenbasis saved with the cache (``eigenbasis.safetensors``), None if none was saved."""
        entry = self.manifest.get("eigenbasis")
        if not entry:
            return None
        return {k: v.clone() for k, v in mmap_tensors(safe_path(self.path, entry["file"])).items()}

    # ---- the FAISS index (BM25: ``indexes``) and the Hub -------------------------------------------

    def build_index(self, kind: str = "auto", **kwargs: Any) -> dict[str, Any]:
        """Build (or resume building) the FAISS index of the rows, stored in the cache; returns its
        manifest entry (``indexes.build_faiss``). ``kwargs``: the fields of
        ``hf_grass.cache.index.IndexSettings`` and the options of
        ``hf_grass.cache.index_build.build_index`` (``rebuild``, ``threads``, ...)."""
        return self.indexes.build_faiss(kind, **kwargs)

    def index(self) -> FaissIndex | None:
        """The FAISS index (loaded once, checked: sha256 and not stale), or None if none is built."""
        return self.indexes.faiss()

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
        data in several resumable commits, the manifest last (``hub.push_folder``). Refused for an
        unfinished build, a lazy pull, or a file that does not match its sha256 (``hub.push_cache``).
        """
        target = hub.PushTarget(repo_id, private, token, revision, commit_message, endpoint, large)
        return hub.push_cache(self, target)

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
