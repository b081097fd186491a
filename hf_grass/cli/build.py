"""``hf-grass build``: the attribution pass over a dataset, into a gradient cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from hf_grass.cli.common import EXIT_OK, PROG, dir_bytes, human_bytes, status
from hf_grass.cli.flags import add_config_arguments, config_from_args
from hf_grass.cli.loaders import (
    add_dataset_arguments,
    add_model_arguments,
    dataset_from_args,
    model_from_args,
)


def cmd_build(args: argparse.Namespace) -> int:
    """Attribution pass over a dataset -> gradient cache, with a progress bar and a summary."""
    config = config_from_args(args)
    dataset = dataset_from_args(args)
    model, tokenizer = model_from_args(args)
    from hf_grass.attribution import run_attribution_pass
    from hf_grass.capture.engine import context_length

    cache_dir = Path(config.cache_dir).expanduser()
    resumed = (cache_dir / "manifest.json").is_file() or (cache_dir / "parts").is_dir()
    status(
        f"Attribution pass: {len(dataset)} examples, {config.compressor} proj_dim={config.proj_dim}, "
        f"preconditioner={config.preconditioner}, into {cache_dir}" + (" (resuming)" if resumed else "")
    )
    start = time.perf_counter()
    cache = run_attribution_pass(
        model,
        dataset,
        config,
        tokenizer,
        cache_dir=cache_dir,
        device=next(model.parameters()).device,
        disable_progress=args.no_progress,
        verify_existing=args.verify,
    )
    elapsed = time.perf_counter() - start
    tokens = count_tokens(dataset, tokenizer, config.max_length or context_length(model))
    s = cache.summary()
    per_module = sorted({m["dim"] for m in cache.modules})
    print(f"Gradient cache written to {cache.path}" + (" (resumed)" if resumed else ""))
    print(
        f"  rows        {s['rows']} of {s['examples']} examples "
        f"({s['skipped']} skipped, {s['truncated']} truncated)"
    )
    print(
        f"  dimension   {s['dim']} per row = {s['modules']} modules x "
        f"{'/'.join(map(str, per_module))} ({s['compressor']}, preconditioner {s['preconditioner']})"
    )
    print(
        f"  on disk     {s['shards']} shard(s) of up to {config.shard_size} rows, {s['dtype']}, "
        f"{human_bytes(dir_bytes(cache.path))}"
    )
    line = f"  time        {elapsed:.1f} s"
    if tokens:
        line += f", {tokens:,} tokens ({tokens / max(elapsed, 1e-9):,.0f} tokens/s)"
    print(line)
    print(f"Next: {PROG} query --cache {cache.path} --prompt '...'")
    return EXIT_OK


def count_tokens(dataset: Any, tokenizer: Any, max_length: int | None) -> int | None:
    """Tokens the pass read (for the throughput line); None when they cannot be counted cheaply."""
    try:
        total = 0
        n = len(dataset)
        for start in range(0, n, 1000):
            rows = dataset[start : start + 1000]
            if isinstance(rows, dict):  # a datasets.Dataset slice is a dict of columns
                ids = rows.get("input_ids")
                texts = rows.get("text")
            else:
                ids = [r["input_ids"] for r in rows] if "input_ids" in rows[0] else None
                texts = [r.get("text") for r in rows]
            if ids is None:
                ids = tokenizer(list(texts))["input_ids"]
            total += sum(min(len(x), max_length or len(x)) for x in ids)
        return total
    except Exception:  # a statistic must never fail the build
        return None


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this command's parser (its flags sit next to its code)."""
    p = sub.add_parser(
        "build",
        parents=[common],
        help="attribution pass over a dataset -> gradient cache",
        description="Run the attribution pass: compress the per-example gradient of every training "
        "document into a sharded on-disk cache (an existing cache with the same configuration is "
        "resumed).",
    )
    add_model_arguments(p, required=True)
    add_dataset_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--verify",
        action="store_true",
        help="when resuming, also check the sha256 of the shards already written and recompute damaged ones",
    )
    add_config_arguments(p)
    p.set_defaults(func=cmd_build)
