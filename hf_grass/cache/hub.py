"""Push a gradient cache to, and pull it from, a Hugging Face Hub *dataset* repo.

**Push** (``GradientCache.push_to_hub``) makes one commit holding ``manifest.json``, every file the
manifest lists (shards, their documents, the preconditioner statistics, the eigenbasis) and a
generated ``README.md`` dataset card. The file list comes from the manifest, not from a directory
walk, so nothing else travels: not ``parts/`` (writer bookkeeping whose merge *is* the manifest), not
lock or temp files, not ``preconditioner/`` (a fit derived from the statistics, recomputed on first
use). The card is uploaded from memory, so the local cache directory is never modified. Files of an
earlier cache in the same repo that the new manifest no longer lists are deleted in that commit, and
the commit is pinned to the head it was planned against (``parent_commit``), so a concurrent push
fails instead of mixing two caches.

**Pull** (``download``, used by ``open_cache`` / ``GradientCache.from_pretrained``) fetches with
``snapshot_download`` into a plain directory (``local_dir`` mode: real files, not symlinks into the
shared blob store, because the reader refuses any manifest path that resolves outside the cache
directory). The default directory is ``<HF_HOME>/hf_grass/datasets--<namespace>--<name>/<revision>``;
a later pull of the same revision only fetches what changed, and works offline from what is there.
The downloaded folder is then opened like any local cache (``hf_grass.cache.reader.open_cache``):
manifest schema and paths first, then every file's sha256, and only then the safetensors headers.

This module only moves files; it never imports the reader (the reader imports it).

The endpoint is the ``endpoint`` argument, else ``HF_ENDPOINT`` as set *now* (``huggingface_hub``
reads it once, at import), else the ``huggingface_hub`` default.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from hf_grass.cache.files import CacheError, sha256_file
from hf_grass.cache.manifest import MANIFEST, safe_path
from hf_grass.config import GraSSConfig

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, DatasetCard

REPO_TYPE = "dataset"
CARD_TAGS = ["hf-grass", "gradient-cache", "data-attribution", "training-data-attribution"]
# repo paths a cache owns: a new push deletes those its manifest does not list (stale shards, ...)
_OWNED_PREFIXES = ("shards/", "stats/", "parts/", "preconditioner/", "index/")
_OWNED_FILES = (MANIFEST, "eigenbasis.safetensors")
_COMPRESSOR_FIELDS = (
    "proj_dim",
    "sparsify_factor",
    "sjlt_nnz",
    "distribution",
    "target_modules",
    "exclude_modules",
)
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")


def _endpoint(endpoint: str | None) -> str | None:
    """The explicit endpoint, else ``HF_ENDPOINT`` read at call time, else None (the client default).

    Passing the endpoint explicitly everywhere matters: ``huggingface_hub`` builds download URLs from
    a template frozen at import time, so a later ``HF_ENDPOINT`` would otherwise be ignored.
    """
    endpoint = endpoint or os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def is_repo_id(value: str) -> bool:
    """Whether ``value`` reads as a Hub repo id ``namespace/name`` (a bare name is taken as a path)."""
    return bool(_REPO_ID.match(value)) and ".." not in value and "--" not in value


def is_local(spec: str | os.PathLike, bare_names_are_repos: bool = False) -> bool:
    """Whether a model, dataset or cache argument means a local path rather than a Hub repo id.

    The one rule for every such argument: a path object, an existing path, anything anchored (``/``,
    ``./``, ``../``, ``~``, ``.``), with more than one slash or with a file suffix is local, so a typo
    in a path is reported as a missing file instead of being sent to the Hub. Otherwise a string of
    the form ``namespace/name`` is a repo id, and so is a bare ``name`` when ``bare_names_are_repos``
    (model ids like ``gpt2``; a bare cache or dataset name is a folder).
    """
    if isinstance(spec, os.PathLike):
        return True
    if Path(spec).expanduser().exists():
        return True
    if (
        spec.startswith(("/", "./", "../", "~", "."))
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
        or re.search(r"\.(jsonl?|txt|csv|parquet|arrow|safetensors|gguf|bin)$", spec)
    ):
        return True
    if bare_names_are_repos and "/" not in spec:
        return not re.fullmatch(_NAME, spec)
    return not is_repo_id(spec)


# ---- dataset card -------------------------------------------------------------------------------


def _size_category(n: int) -> str:
    bounds = [(10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M")]
    bounds += [(10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B")]
    return next((label for limit, label in bounds if n < limit), "n>10B")


def _cell(value: Any) -> str:
    """A markdown table cell: code-formatted, with the characters that would break the table escaped."""
    if value is None or value == "":
        return "unknown"
    text = str(value).replace("|", "\\|").replace("\n", " ").replace("`", "'")
    return f"`{text}`"


def dataset_card(manifest: dict[str, Any], repo_id: str, revision: str | None = None) -> DatasetCard:
    """The ``README.md`` of a pushed cache, read off its manifest: tags in the YAML header; the model,
    compressor, seed, dtype, size and how to load it in the body."""
    from huggingface_hub import DatasetCard, DatasetCardData

    model, config = manifest["model"], GraSSConfig.from_dict(manifest["config"])
    num_rows = sum(s["rows"] for s in manifest["shards"])
    model_name, model_rev = model.get("name_or_path"), model.get("revision")
    data = DatasetCardData(
        pretty_name=f"hf-grass gradient cache: {model_name or model.get('class') or 'model'}",
        tags=CARD_TAGS,
        size_categories=[_size_category(num_rows)],
        # not a table the dataset viewer can show (safetensors shards + a JSON manifest)
        viewer=False,
    )
    # the compressor's own parameters (seed, dtype, ... get rows of their own)
    compressor = {k: v for k, v in config.cache_dict().items() if k in _COMPRESSOR_FIELDS and v is not None}
    rev_arg = f', revision="{revision}"' if revision not in (None, "main") else ""
    if model_name:
        model_rev_arg = f', revision="{model_rev}"' if model_rev else ""
        load_model = (
            f'model = AutoModelForCausalLM.from_pretrained("{model_name}"{model_rev_arg})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{model_name}"{model_rev_arg})'
        )
    else:
        load_model = (
            f"model = ...      # the {model.get('class', 'model')} the cache was built with "
            f"(weights fingerprint {model.get('weights_sha256')})\ntokenizer = ..."
        )
    cache_arg = f'"{repo_id}"' if not rev_arg else "cache"
    skipped = sum(len(s["skipped"]) for s in manifest["shards"])
    rows = [
        ("Model class", _cell(model.get("class"))),
        ("Model", _cell(model_name)),
        ("Model revision", _cell(model_rev)),
        ("Weights fingerprint", _cell(model.get("weights_sha256"))),
        ("Compressor", _cell(config.compressor)),
        ("Compressor config", _cell(json.dumps(compressor, sort_keys=True))),
        ("Seed", _cell(config.seed)),
        ("Storage dtype", _cell(config.dtype)),
        ("Rows", f"{num_rows} (of {manifest['num_examples']} examples, {skipped} skipped)"),
        ("Dimension", f"{manifest['dim']} per row, over {len(manifest['modules'])} modules"),
        ("Loss", _cell(config.loss_reduction)),
        ("Preconditioner", f"{_cell(config.preconditioner)} (damping {config.damping})"),
        ("Shards", str(len(manifest["shards"]))),
        ("Cache format", f"{manifest['format']} v{manifest['format_version']}"),
        ("Written by", f"hf-grass {manifest.get('library_version', '')}".strip()),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    body = f"""
# {data.pretty_name}

Compressed per-example training gradients written by **hf-grass** for training-data attribution:
given a prompt, `find_influential` returns the training documents that most helped (positive
score) or hurt (negative score) the model's completion.

| | |
|---|---|
{table}

The full configuration and the per-module layout are in `manifest.json`, with the sha256 of every
file; `GradientCache.from_pretrained` checks all of them before anything is used.

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_grass import GradientCache, find_influential

{load_model}
cache = GradientCache.from_pretrained("{repo_id}"{rev_arg})  # downloads and verifies every file
result = find_influential("Your prompt", model=model, tokenizer=tokenizer, cache={cache_arg}, k=10)
print(result)
```

Scores are only meaningful with the model the cache was built with: `find_influential` compares
the model's weights fingerprint with the one above and refuses another model.

## Files

- `manifest.json`: configuration, model fingerprint, module layout, and the sha256 of every file
- `shards/shard-NNNNNN.safetensors`: `grads` [rows, {manifest["dim"]}] ({config.dtype}) and `indices` [rows] (dataset index)
- `shards/shard-NNNNNN.jsonl`: the training documents of those rows (`index`, `text`, `id`)
- `stats/`, `eigenbasis.safetensors`: the sums the preconditioner is fitted from
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")


# ---- push ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushTarget:
    """Where and how ``push_folder`` uploads: the dataset repo (created if needed, ``private`` then),
    its branch ``revision`` (created if needed), the ``token`` and Hub ``endpoint``, the commit
    message, and with ``large`` several commits of at most ``batch_files`` files / ``batch_bytes``
    bytes."""

    repo_id: str
    private: bool = False
    token: str | None = None
    revision: str | None = None
    commit_message: str | None = None
    endpoint: str | None = None
    large: bool = False
    batch_files: int = 500
    batch_bytes: int = 4 << 30


def push_folder(root: Path, manifest: dict[str, Any], files: list[Path], target: PushTarget) -> CommitInfo:
    """Upload a verified cache (``manifest.json`` plus ``files``, with a dataset card) to the dataset
    repo ``target.repo_id`` in one commit, or with ``target.large`` in several.

    ``large``: the data files go up in commits of at most ``batch_files`` files / ``batch_bytes``
    bytes, then one last commit adds ``manifest.json`` and the card and deletes stale files, so the
    repo never shows a manifest whose files are not all there. Resumable: run it again after an
    interruption and files already committed are skipped (``create_commit`` drops unchanged files),
    and LFS objects already uploaded are not sent again (the LFS batch API answers without an
    upload action). ``huggingface_hub`` 2.x has no ``upload_large_folder`` any more; its successor,
    ``upload_folder``, is multi-commit and resumable only over Xet storage, so this uses
    ``create_commit`` in batches, which works with LFS and Xet alike.

    Creates the repo (and the branch ``revision``) if needed. Returns the ``CommitInfo`` of the
    (last) commit: a ``str`` holding the commit URL, with the commit id in ``.oid``.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    repo_id, revision = target.repo_id, target.revision
    api = HfApi(endpoint=_endpoint(target.endpoint), token=target.token)
    api.create_repo(repo_id, repo_type=REPO_TYPE, private=target.private, exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True)

    root = root.resolve()
    uploads = {MANIFEST: root / MANIFEST}
    for path in files:
        uploads[path.resolve().relative_to(root).as_posix()] = path
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path))
        for rel, path in sorted(uploads.items())
    ]
    card = str(dataset_card(manifest, repo_id, revision)).encode()
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    config = manifest["config"]
    rows = sum(s["rows"] for s in manifest["shards"])
    message = target.commit_message or (
        f"Upload hf-grass gradient cache ({rows} rows, {config['compressor']}, dim {manifest['dim']})"
    )
    if target.large:
        data = [op for op in operations if op.path_in_repo not in (MANIFEST, "README.md")]
        operations = [op for op in operations if op.path_in_repo in (MANIFEST, "README.md")]
        batches: list[list[Any]] = [[]]
        size = 0
        for op in data:
            nbytes = Path(op.path_or_fileobj).stat().st_size
            if batches[-1] and (len(batches[-1]) >= target.batch_files or size + nbytes > target.batch_bytes):
                batches.append([])
                size = 0
            batches[-1].append(op)
            size += nbytes
        for number, batch in enumerate(batches, 1):
            api.create_commit(
                repo_id,
                batch,
                commit_message=f"{message} (data, part {number} of {len(batches)})",
                repo_type=REPO_TYPE,
                revision=revision,
            )

    head = api.repo_info(repo_id, repo_type=REPO_TYPE, revision=revision).sha
    remote = api.list_repo_files(repo_id, repo_type=REPO_TYPE, revision=head)
    operations += [
        CommitOperationDelete(path_in_repo=f)
        for f in remote
        if (f.startswith(_OWNED_PREFIXES) or f in _OWNED_FILES) and f not in uploads
    ]
    return api.create_commit(
        repo_id,
        operations,
        commit_message=message,
        repo_type=REPO_TYPE,
        revision=revision,
        parent_commit=head,  # fail rather than mix with a push that landed since we listed the repo
    )


def push_cache(cache: Any, target: PushTarget) -> CommitInfo:
    """Upload an open cache (``GradientCache.push_to_hub``): refused unless the build is finished,
    every file is here (not a lazy pull) and matches its sha256; then ``push_folder``."""
    if not cache.manifest["complete"]:
        raise CacheError(
            f"{cache.path} is an unfinished build ({cache.num_rows} of {cache.manifest['num_examples']} "
            "rows); run the build again to finish it before pushing."
        )
    if cache.remote is not None and not all(path.is_file() for path, _ in cache.files()):
        raise CacheError(f"{cache.path} is a lazy pull, not all of it is here; pull it with lazy=False to push")
    # never publish a damaged cache: every file must match its sha256 (and pushing writes nothing here)
    cache.verify(full=True, remember=False)
    return push_folder(cache.path, cache.manifest, [path for path, _ in cache.files()], target)


# ---- pull ---------------------------------------------------------------------------------------


def default_local_dir(repo_id: str, revision: str | None = None) -> Path:
    """Where a pulled cache lives by default: ``<HF_HOME>/hf_grass/datasets--ns--name/<revision>``."""
    from huggingface_hub import constants

    home = os.environ.get("HF_HOME") or constants.HF_HOME  # read now, not at import
    folder = "datasets--" + repo_id.replace("/", "--")
    return Path(home).expanduser() / "hf_grass" / folder / quote(revision or "main", safe="")


# what a lazy pull downloads up front: everything but the shards (rows and documents)
LAZY_UP_FRONT = [MANIFEST, "README.md", "stats/*", "eigenbasis.safetensors", "index/*"]


class RemoteFiles:
    """The files of a lazily pulled cache that are fetched when first needed, from one commit.

    ``fetch`` downloads them with ``hf_hub_download`` into the cache folder and checks each against
    its sha256 from the manifest before anything reads it (a mismatch deletes the file and raises).
    """

    def __init__(
        self, repo_id: str, commit: str, root: Path, token: str | None = None, endpoint: str | None = None
    ):
        self.repo_id, self.commit, self.root = repo_id, commit, root
        self.token, self.endpoint = token, endpoint
        self.fetched: list[str] = []  # in order: what a query made us download

    @staticmethod
    def lazy(rel: str) -> bool:
        return rel.startswith("shards/")

    def fetch(self, files: list[tuple[str, str]]) -> None:
        from huggingface_hub import hf_hub_download

        for rel, sha256 in files:
            path = safe_path(self.root, rel)
            if path.is_file() and sha256_file(path) == sha256:
                continue
            hf_hub_download(
                self.repo_id,
                rel,
                repo_type=REPO_TYPE,
                revision=self.commit,  # the manifest's commit, even if the branch moved since
                local_dir=self.root,
                token=self.token,
                endpoint=_endpoint(self.endpoint),
            )
            if sha256_file(path) != sha256:
                path.unlink(missing_ok=True)
                raise CacheError(
                    f"{rel} of {self.repo_id}@{self.commit[:12]} does not match the sha256 in its manifest; "
                    "nothing was loaded from it. The repo is damaged: push the cache again."
                )
            self.fetched.append(rel)


def download(
    repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    local_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    lazy: bool = False,
) -> tuple[Path, RemoteFiles | None]:
    """Download the cache in the dataset repo ``repo_id`` into a plain folder; returns the folder
    (and, with ``lazy``, the ``RemoteFiles`` that fetch the shards on demand).

    ``lazy``: download only the manifest, statistics, eigenbasis and indexes now, pinned to the
    commit the revision points to; shards come when a read needs them (``GradientCache.rows.rows_at``
    after an index lookup reads only the shards holding candidates). Nothing is checked here:
    ``open_cache`` opens the folder like any other cache.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    target = Path(local_dir) if local_dir is not None else default_local_dir(repo_id, revision)
    remote = None
    try:
        if lazy:
            api = HfApi(endpoint=_endpoint(endpoint), token=token)
            revision = api.repo_info(repo_id, repo_type=REPO_TYPE, revision=revision).sha
            remote = RemoteFiles(repo_id, revision, target, token, endpoint)
        folder = snapshot_download(
            repo_id,
            repo_type=REPO_TYPE,
            revision=revision,
            allow_patterns=LAZY_UP_FRONT if lazy else None,
            local_dir=target,
            token=token,
            endpoint=_endpoint(endpoint),
            force_download=force_download,
            # a pulled cache fits its own preconditioner: a fit shipped in the repo would be loaded
            # unchecked (no checksum in the manifest), and writer parts are of no use to a reader
            ignore_patterns=["preconditioner/*", "parts/*"],
        )
    except RepositoryNotFoundError as err:
        err.append_to_message(
            f"\n(hf-grass: there is no local directory {repo_id!r} either; a gradient cache on the Hub is a "
            "*dataset* repo, created by GradientCache.push_to_hub.)"
        )
        raise
    return Path(folder), remote
