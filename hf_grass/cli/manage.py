"""``hf-grass info | push | pull``: what a cache holds, and moving it to and from the Hub."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from hf_grass.cli.common import EXIT_OK, PROG, UsageError, dir_bytes, human_bytes, status
from hf_grass.cli.loaders import open_cache_arg

if TYPE_CHECKING:
    from hf_grass.cache.reader import GradientCache


def compressor_line(cache: GradientCache) -> str:
    """The compressor and the settings that apply to the cache's layout."""
    cfg = cache.config
    if cfg.compressor == "factgrass" and cfg.total_dim is not None:
        where = "eigen-directions of the warm-up K-FAC factors" if cfg.eigen_masks else "input coordinates"
        return f"factgrass, {cfg.factor_dim} coordinates per factor side ({where}), seed {cfg.seed}"
    extra = f", sparsify_factor {cfg.sparsify_factor}" if cfg.compressor in ("factgrass", "grass") else ""
    return f"{cfg.compressor}, {cfg.proj_dim} numbers per module{extra}, seed {cfg.seed}"


def layout_line(cache: GradientCache) -> str:
    """How a row is laid out: shared by every module (global), or one block per module."""
    n = len(cache.modules)
    if cache.manifest["layout"] == "global":
        return f"global: one row of {cache.dim} numbers, every one of the {n} modules projected into all of it"
    if cache.config.total_dim is not None:
        return f"embedded: the {n} modules' factor spaces stored as they are, {cache.dim} numbers per row"
    return f"per module: {n} blocks of {cache.config.proj_dim} numbers, {cache.dim} per row"


def cmd_info(args: argparse.Namespace) -> int:
    """A cache's summary (``GradientCache.summary()``), readable or as JSON; ``--verify`` checks files.

    Without ``--verify`` only sizes and headers are checked, so a damaged cache can still be described.
    """
    cache = open_cache_arg(args.cache, verify=False)
    summary = cache.summary()
    summary["bytes_on_disk"] = dir_bytes(cache.path)
    if args.verify:
        cache.verify(full=True)  # raises CacheError (exit 1) naming the first bad file
        summary["verified_files"] = len(cache.files())
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    cfg, model = cache.config, summary["model"]
    rows = [
        (
            "rows",
            f"{summary['rows']} of {summary['examples']} examples ({summary['skipped']} skipped, "
            f"{summary['truncated']} truncated), {'complete' if summary['complete'] else 'INCOMPLETE'}",
        ),
        ("compressor", compressor_line(cache)),
        ("layout", layout_line(cache)),
        (
            "scoring",
            f"preconditioner {summary['preconditioner']}, damping {cfg.damping}, "
            f"cosine {'on' if cfg.cosine else 'off'}, loss {cfg.loss_reduction}",
        ),
        (
            "storage",
            f"{summary['dtype']}, {summary['shards']} shard(s) of up to {cfg.shard_size} rows, "
            f"{human_bytes(summary['bytes_on_disk'])} on disk",
        ),
        ("model", f"{model.get('class')} {model.get('name_or_path') or '(no name recorded)'}"),
        ("weights", f"sha256 {model.get('weights_sha256')} (revision {model.get('revision') or '-'})"),
    ]
    for key, label in (("index", "index"), ("lexical_index", "bm25")):
        entry = cache.manifest.get(key)
        if entry:
            from hf_grass.cache.index import stale_reason

            stale = stale_reason(entry, cache.manifest)
            what = entry.get("factory", "BM25") + (" cosine" if entry.get("cosine") else "")
            rows.append((label, f"{what}, {entry['rows']} rows" + (f" (STALE: {stale})" if stale else "")))
    names = cache.module_names
    rows.append(
        ("modules", ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else ""))
    )
    if args.verify:
        rows.append(("verified", f"all {summary['verified_files']} files match their sha256"))
    print(f"Gradient cache {summary['path']}")
    for key, value in rows:
        print(f"  {key:<11} {value}")
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    """Upload a cache to a Hub dataset repo (verified first; one commit)."""
    from hf_grass.cache.hub import is_repo_id

    if not is_repo_id(args.repo_id):
        raise UsageError(f"{args.repo_id!r} is not a Hub repo id; expected namespace/name")
    cache = open_cache_arg(args.cache_dir)
    status(f"Pushing {cache.num_rows} rows from {cache.path} to the dataset repo {args.repo_id} ...")
    commit = cache.push_to_hub(
        args.repo_id,
        private=args.private,
        token=args.token,
        revision=args.revision,
        commit_message=args.commit_message,
        large=args.large,
    )
    oid = getattr(commit, "oid", None)
    print(f"Pushed {cache.path} to {args.repo_id}" + (f" (commit {oid[:12]})" if oid else ""))
    print(f"  {commit}")
    print(f"Use it anywhere: {PROG} query --cache {args.repo_id} --prompt '...'")
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a cache from the Hub into a local directory, checking every checksum."""
    from hf_grass.cache.hub import is_repo_id
    from hf_grass.cache.reader import open_cache

    if not is_repo_id(args.repo_id):
        raise UsageError(f"{args.repo_id!r} is not a Hub repo id; expected namespace/name")
    if Path(args.repo_id).exists():
        raise UsageError(f"{args.repo_id!r} is a local path; pull takes a Hub repo id (namespace/name)")
    status(f"Pulling {args.repo_id}@{args.revision or 'main'} ...")
    cache = open_cache(
        args.repo_id,
        revision=args.revision,
        token=args.token,
        local_dir=args.local_dir,
        force_download=args.force_download,
    )
    print(
        f"Pulled {args.repo_id}@{args.revision or 'main'} to {cache.path} ({cache.num_rows} rows, verified)"
    )
    print(f"Next: {PROG} info {cache.path}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this command's parser (its flags sit next to its code)."""
    p = sub.add_parser(
        "info",
        parents=[common],
        help="summary of a gradient cache",
        description="Summarise a gradient cache.",
    )
    p.add_argument("cache", metavar="CACHE", help="gradient cache directory or Hub dataset repo id")
    p.add_argument("--verify", action="store_true", help="check the sha256 of every file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "push",
        parents=[common],
        help="upload a gradient cache to a Hub dataset repo",
        description="Upload a (complete, verified) gradient cache with a dataset card to a Hugging Face "
        "dataset repo in one commit.",
    )
    p.add_argument("cache_dir", metavar="CACHE_DIR", help="the gradient cache directory")
    p.add_argument("repo_id", metavar="REPO_ID", help="dataset repo, namespace/name (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created if needed; default: main)")
    p.add_argument("--token", help="Hub token (default: the saved login or HF_TOKEN)")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument(
        "--large",
        action="store_true",
        help="large caches: the data in several resumable commits, the manifest last",
    )
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "pull",
        parents=[common],
        help="download a gradient cache from the Hub",
        description="Download a gradient cache from a Hub dataset repo and verify every checksum.",
    )
    p.add_argument("repo_id", metavar="REPO_ID", help="dataset repo, namespace/name")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument(
        "--local-dir",
        help="where to put it (default: <HF_HOME>/hf_grass/datasets--<namespace>--<name>/<revision>)",
    )
    p.add_argument("--token", help="Hub token for private repos")
    p.add_argument("--force-download", action="store_true", help="download every file again")
    p.set_defaults(func=cmd_pull)
