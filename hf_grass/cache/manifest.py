"""The cache manifest: schema, validation and merging of per-process parts.

Layout of a cache directory::

    manifest.json                  what readers read (merged view of all parts)
    parts/rank{r}-of{W}.json       each writer process's own manifest, rewritten after every shard
    shards/shard-{id:06d}.safetensors   "grads" [rows, dim] (storage dtype), "indices" [rows] int64,
                                   and for int8 rows "scales" [rows] float32 (row = grads * scale)
    shards/shard-{id:06d}.jsonl    the documents of those rows: {"index", "text", "id"}
    stats/rank{r}-{seq:06d}.safetensors running float64 sums for the preconditioner
    eigenbasis.safetensors         warm-up K-FAC eigenvectors and row whitening (kfac/ekfac only)
    index/faiss-*.index            the FAISS index of the rows, if built ("index" entry, cache/index.py)
    index/bm25-*/                  the BM25 index of the documents, if built ("lexical_index", cache/lexical.py)
    preconditioner/                fitted preconditioners (eigendecompositions), written on first use

Shard ``s`` holds dataset examples ``[s * shard_size, (s + 1) * shard_size)`` minus skipped ones, so
the content does not depend on how many processes wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from hf_grass.cache.files import CacheError

FORMAT = "hf-grass-gradient-cache"
# 2 (hf-grass 0.2): typed eigenbasis files with factor maps (wide sides hashed with whitening
# weights, their curvature per coordinate), norms with every row, the layout always recorded. Caches
# of format 1 are refused: their wide factors' estimator was biased and their files differ.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PARTS_DIR = "parts"

_REQUIRED = {
    "format": str,
    "format_version": int,
    "config": dict,
    "config_hash": str,
    "model": dict,
    "modules": list,
    "dim": int,
    "dtype": str,
    "num_examples": int,
    "shard_size": int,
    "world_size": int,
    "shards": list,
    "stats": list,
    "complete": bool,
}
_SHARD_FIELDS = {
    "id": int,
    "file": str,
    "docs": str,
    "rows": int,
    "sha256": str,
    "docs_sha256": str,
    "skipped": list,
}
STORAGE_DTYPES = ("int8", "float16", "bfloat16", "float32")
_MODULE_FIELDS = {"name": str, "d_in": int, "d_out": int, "bias": bool, "offset": int, "dim": int}


def part_name(rank: int, world_size: int) -> str:
    return f"{PARTS_DIR}/rank{rank}-of{world_size}.json"


def shard_names(shard_id: int) -> tuple[str, str]:
    return f"shards/shard-{shard_id:06d}.safetensors", f"shards/shard-{shard_id:06d}.jsonl"


def safe_path(root: Path, rel: str) -> Path:
    """Resolve a manifest path, refusing anything outside the cache directory."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise CacheError(f"manifest names an invalid path {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(part in ("..", "") for part in pure.parts):
        raise CacheError(f"manifest names a path outside the cache directory: {rel!r}; refusing to read it")
    full = (root / pure).resolve()
    if root.resolve() not in full.parents:
        raise CacheError(f"manifest names a path outside the cache directory: {rel!r}; refusing to read it")
    return full


def validate_manifest(manifest: Any, root: Path) -> dict[str, Any]:
    """Check the schema, types, sizes and paths of a manifest before any array is read."""
    if not isinstance(manifest, dict):
        raise CacheError(f"{root / MANIFEST} is not a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in manifest:
            raise CacheError(
                f"{root / MANIFEST} lacks the field {key!r}; it is not an hf-grass cache or is damaged"
            )
        if not isinstance(manifest[key], typ) or (typ is int and isinstance(manifest[key], bool)):
            raise CacheError(f"{root / MANIFEST}: field {key!r} has the wrong type")
    if manifest["format"] != FORMAT:
        raise CacheError(f"{root} is not an hf-grass gradient cache (format {manifest['format']!r})")
    if manifest["format_version"] > FORMAT_VERSION:
        raise CacheError(
            f"{root} was written by a newer hf-grass (format {manifest['format_version']}); upgrade hf-grass"
        )
    if manifest["format_version"] < FORMAT_VERSION:
        raise CacheError(
            f"{root} was written by hf-grass 0.1 (cache format {manifest['format_version']}), which this version "
            f"does not read (format {FORMAT_VERSION}: new eigenbasis files, an unbiased estimator for wide "
            "factors, norms with every row). Rebuild it: run the same build with this version into a new directory."
        )
    if manifest["dtype"] not in STORAGE_DTYPES:
        raise CacheError(f"{root / MANIFEST}: unsupported dtype {manifest['dtype']!r}")
    layout = manifest.get("layout")
    if layout not in ("module", "global"):
        raise CacheError(f"{root / MANIFEST}: unknown layout {layout!r}")
    offset = 0
    for module in manifest["modules"]:
        _check_fields(module, _MODULE_FIELDS, root, "module")
        if layout == "global":  # every module is projected into the whole row
            if module["offset"] != 0 or module["dim"] != manifest["dim"]:
                raise CacheError(f"{root / MANIFEST}: module {module['name']!r} does not span the shared row")
            continue
        if module["offset"] != offset or module["dim"] <= 0:
            raise CacheError(f"{root / MANIFEST}: module offsets are inconsistent at {module['name']!r}")
        offset += module["dim"]
    if layout == "module" and offset != manifest["dim"]:
        raise CacheError(f"{root / MANIFEST}: module dims add up to {offset}, not dim={manifest['dim']}")
    seen: set[int] = set()
    for shard in manifest["shards"]:
        _check_fields(shard, _SHARD_FIELDS, root, "shard")
        if shard["id"] in seen or shard["rows"] < 0 or shard["rows"] > manifest["shard_size"]:
            raise CacheError(f"{root / MANIFEST}: shard {shard['id']} is listed twice or has an invalid size")
        seen.add(shard["id"])
        safe_path(root, shard["file"])
        safe_path(root, shard["docs"])
    for entry in manifest["stats"]:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("file"), str)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise CacheError(f"{root / MANIFEST}: invalid stats entry {entry!r}")
        safe_path(root, entry["file"])
    documents = manifest.get("documents")
    if documents is not None:
        prefix = documents.get("prefix") if isinstance(documents, dict) else 0
        if prefix is not None and not (isinstance(prefix, list) and all(isinstance(t, int) for t in prefix)):
            raise CacheError(f"{root / MANIFEST}: invalid documents entry {documents!r}")
    if manifest.get("eigenbasis") is not None:
        basis = manifest["eigenbasis"]
        if not isinstance(basis, dict) or not isinstance(basis.get("file"), str):
            raise CacheError(f"{root / MANIFEST}: invalid eigenbasis entry")
        safe_path(root, basis["file"])
    for key in ("index", "lexical_index"):
        _check_index_entry(manifest.get(key), root, key)
    return manifest


def _check_index_entry(entry: Any, root: Path, key: str) -> None:
    """An optional index entry: its files (inside the cache, with a sha256) and what it was built from."""
    if entry is None:
        return
    files = entry.get("files") if isinstance(entry, dict) else None
    built = entry.get("built_from") if isinstance(entry, dict) else None
    if (
        not isinstance(files, list)
        or not files
        or not isinstance(built, dict)
        or not isinstance(built.get("shards"), list)
    ):
        raise CacheError(f"{root / MANIFEST}: invalid {key!r} entry; delete it and build the index again")
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("file"), str) or not isinstance(f.get("sha256"), str):
            raise CacheError(f"{root / MANIFEST}: invalid file in the {key!r} entry")
        safe_path(root, f["file"])


def carry_indexes(root: Path, merged: dict[str, Any]) -> dict[str, Any]:
    """Keep the index entries of the manifest on disk in a re-merged one: a writer rewriting the
    manifest (a resumed or repeated build) must not drop them silently. If the shards changed, the
    kept entry is stale and readers refuse it, naming the fix."""
    path = root / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return merged
        for key in ("index", "lexical_index"):
            if isinstance(old, dict) and old.get(key):
                merged[key] = old[key]
    return merged


def _check_fields(obj: Any, fields: dict[str, type], root: Path, what: str) -> None:
    if not isinstance(obj, dict):
        raise CacheError(f"{root / MANIFEST}: a {what} entry is not an object")
    for key, typ in fields.items():
        if not isinstance(obj.get(key), typ) or (typ is int and isinstance(obj.get(key), bool)):
            raise CacheError(f"{root / MANIFEST}: a {what} entry has a missing or invalid {key!r}")


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise CacheError(
            f"{path} does not parse as JSON ({err}); it is damaged. If it is a part or the manifest of an "
            "unfinished build, delete it and rebuild (completed shards are re-checked against their files)."
        ) from None


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One manifest from the per-process parts (shards sorted by id, stats by rank)."""
    if not parts:
        raise ValueError("no parts to merge")
    merged = {k: v for k, v in parts[0].items() if k not in ("shards", "stats", "rank", "complete")}
    merged["shards"] = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["id"])
    merged["stats"] = sorted((s for p in parts for s in p["stats"]), key=lambda s: s["rank"])
    merged["complete"] = all(p["complete"] for p in parts)
    merged["num_rows"] = sum(s["rows"] for s in merged["shards"])
    if isinstance(merged.get("documents"), dict):
        merged["documents"] = merge_document_encoding(merged["documents"], merged["shards"])
    return merged


def common_prefix(sequences: Sequence[Sequence[int] | None]) -> list[int] | None:
    """The longest prefix every sequence shares (``None`` if one is unknown or there are none).

    One function for both levels of the documents' prefix: a shard's, from its documents (the
    attribution pass), and the cache's, from its shards (``merge_document_encoding``).
    """
    if not sequences or any(s is None for s in sequences):
        return None
    first = list(sequences[0])  # type: ignore[arg-type]
    length = len(first)
    for seq in sequences[1:]:
        seq = list(seq)  # type: ignore[arg-type]
        length = min(length, len(seq))
        length = next((i for i in range(length) if seq[i] != first[i]), length)
    return first[:length]


def merge_document_encoding(header: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
    """How the cached documents begin, from the tokenizer's record and every shard's prefix.

    - ``prefix``: the special token ids every cached document begins with (``None`` when a shard
      does not know, e.g. no tokenizer, no token ids, or a shard written by an older version);
      queries begin with exactly these;
    - ``extra_prefix``: the part of it the tokenizer does not add itself (``<eos>`` first, as many
      pretraining pipelines do);
    - ``chat_template``: whether the documents begin the way the tokenizer's chat template begins a
      conversation; ``None`` when that cannot be told (no template, or a template that begins with
      nothing the tokenizer does not add anyway).
    """
    out = dict(header)  # the writer's own part must not change
    prefixes = [s.get("prefix") for s in shards if s["rows"] > 0]
    prefix = common_prefix([p if isinstance(p, list) else None for p in prefixes])  # None: unknown
    own, chat = out.get("tokenizer_prefix"), out.get("chat_prefix")
    out["prefix"] = prefix
    out["extra_prefix"] = None
    if prefix is not None and isinstance(own, list):
        out["extra_prefix"] = prefix[len(own) :] if prefix[: len(own)] == own else prefix
    out["chat_template"] = None
    tellable = (
        isinstance(chat, list) and isinstance(own, list) and len(chat) > len(own) and chat[: len(own)] == own
    )
    if prefix is not None and tellable:
        out["chat_template"] = prefix[: len(chat)] == chat
    return out
