"""Push a gradient cache to, and pull it from, a Hugging Face Hub *dataset* repo."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_grass.cache.reader import GradientCache


def push_to_hub(
    cache: GradientCache,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload the cache directory (with a dataset card) to ``repo_id``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=str(cache.path),
        revision=revision,
        commit_message=commit_message or f"Upload hf-grass gradient cache ({cache.num_rows} rows)",
        ignore_patterns=[".lock-*", "**/.*.tmp-*", "preconditioner/*"],
    )
    return str(getattr(info, "commit_url", info))


def load_cache(
    repo_id_or_path: str | os.PathLike, revision: str | None = None, token: str | None = None
) -> GradientCache:
    """A local cache directory, or a Hub dataset repo downloaded and verified (sha256 of every file)."""
    from hf_grass.cache.reader import GradientCache

    path = Path(repo_id_or_path)
    if path.is_dir():
        return GradientCache(path)
    from huggingface_hub import snapshot_download

    local = snapshot_download(str(repo_id_or_path), repo_type="dataset", revision=revision, token=token)
    return GradientCache(local, verify=True)
