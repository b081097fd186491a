"""Batched queries: top-k and bottom-k of many queries over a large cache, streamed, against one
in-RAM ``torch.mm`` of the same size.

- ``stream (library)``: ``hf_grass.scoring.scan(cache, queries, k, top=True, bottom=True)``: blocks
  of rows converted to float32 (``GradientCache.rows.iter_row_blocks``), one matrix-matrix product per
  block, pending scores merged into the running lists every ``TopKAccumulator.flush_rows`` rows;
  no ``[n_query, n_rows]`` matrix.
- ``torch.mm in RAM``: every row already in RAM as float32, ``torch.mm(queries, rows.T)``: the
  product alone (no top-k, no conversion, no I/O), the target's baseline. If the machine has not
  the memory for rows plus the ``[n_query, n_rows]`` output, it runs on the first rows that fit
  and is reported as rows/s (the product's cost is linear in the rows).
- ``two-stage (index)``: ``scoring.lookup(..., search="index")`` for all queries at once, if the
  cache has an index.

Peak RSS of a streaming scan is measured in a fresh subprocess per cache size (hard-linked prefixes
of the cache): the increase of ``VmHWM`` over the RSS after opening the cache and loading the
queries. Warm page cache; one thread; variants interleaved (``time_interleaved``).

    python -m benchmarks.batched --rows-dir /tmp/rows1m --json-out batched.json
    python -m benchmarks.batched --rows-dir /tmp/rows-smoke --smoke     # real_rows --smoke's rows: checks it runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from benchmarks._common import REPO_ROOT, cpu_name, emit_report, parse_with_smoke, time_interleaved
from benchmarks.query import child_env, prefix_cache
from hf_grass.cache.reader import GradientCache
from hf_grass.scoring import lookup, scan

GOAL = 0.7
SMOKE = {"n_query": 16, "repeats": 1, "rss_fractions": [0.5, 1.0]}


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def child(cache_dir: Path, queries_file: Path, n_query: int, k: int) -> None:
    torch.set_num_threads(1)
    cache = GradientCache(cache_dir)
    queries = load_file(str(queries_file))["queries"][:n_query]
    base = status_kb("VmRSS")
    start = time.perf_counter()
    scan(cache, queries, k, top=True, bottom=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": cache.num_rows, "base_mb": base / 1024, "peak_mb": status_kb("VmHWM") / 1024,
                      "increase_mb": (status_kb("VmHWM") - base) / 1024, "seconds": seconds}))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows-dir", type=Path, required=True, help="output folder of benchmarks.real_rows")
    parser.add_argument("--n-query", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rss-fractions", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--mm-max-gb", type=float, default=None,
                        help="cap on the float32 rows of the in-RAM product (default: what is free; a "
                        "shared machine may want less)")  # fmt: skip
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parse_with_smoke(parser, argv, SMOKE)
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]), int(args.child[3]))
        return
    torch.set_num_threads(1)
    cache = GradientCache(args.rows_dir / "cache")
    queries_file = args.rows_dir / "queries.safetensors"
    queries = load_file(str(queries_file))["queries"][: args.n_query].contiguous()
    nq, n, dim = queries.shape[0], cache.num_rows, cache.dim
    # rows for the in-RAM product: all, if rows + output (+ 2 GB to spare) fit in what is free
    fit = int((mem_available() - (2 << 30)) // (4 * (dim + nq)))
    if args.mm_max_gb is not None:
        fit = min(fit, int(args.mm_max_gb * 1e9 // (4 * dim)))
    mm_rows = min(n, max(1, fit))
    print(f"{nq} queries x {n} rows x {dim}; in-RAM product over {mm_rows} rows", flush=True)
    rows32 = torch.empty(mm_rows, dim)
    pos = 0
    for block in cache.rows.iter_row_blocks(1 << 14):
        take = min(block.rows.shape[0], mm_rows - pos)
        rows32[pos : pos + take] = block.rows[:take]
        pos += take
        if pos >= mm_rows:
            break
    out = torch.empty(nq, mm_rows)
    # the lists must be right before they are timed: against the product's own top-k
    got = scan(cache, queries[:50], args.k, top=True, bottom=True)
    if mm_rows == n:
        ref = torch.mm(queries[:50], rows32.T).topk(args.k, dim=1)
        assert torch.allclose(got.top.scores, ref.values, rtol=1e-4, atol=1e-4), "streaming lists differ"
    ram = {"rows": rows32, "out": out}
    del rows32, out
    calls = {
        "stream (library)": lambda: scan(cache, queries, args.k, top=True, bottom=True),
        "torch.mm in RAM": lambda: torch.mm(queries, ram["rows"].T, out=ram["out"]),
    }
    if cache.manifest.get("index"):
        calls["two-stage (index)"] = lambda: lookup(cache, queries, args.k, search="index", top=True, bottom=True)
        lookup(cache, queries[:1], args.k, search="index")  # load the index before the timing
    timed = time_interleaved(calls, args.repeats, warmup=0, progress=True)
    ram.clear()  # free the in-RAM copy before the RSS subprocesses
    med = {name: statistics.median(ts) for name, ts in timed.wall.items()}
    rows_per_s = {name: (mm_rows if name == "torch.mm in RAM" else n) / t for name, t in med.items()}
    ratio = rows_per_s["stream (library)"] / rows_per_s["torch.mm in RAM"]
    print(f"goal stream >= {GOAL}x torch.mm: {ratio:.2f}x -> {'met' if ratio >= GOAL else 'NOT met'}")

    rss = []
    work = args.work or args.rows_dir / "batched_bench"
    for frac in args.rss_fractions:
        rows = max(1, int(n * frac))
        target = cache.path if rows >= n else work / f"prefix-{rows}"
        if rows < n:
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            prefix_cache(cache.path, target, rows)
        cmd = [sys.executable, "-m", "benchmarks.batched", "--rows-dir", str(args.rows_dir),
               "--child", str(target), str(queries_file), str(nq), str(args.k)]  # fmt: skip
        res = subprocess.run(cmd, env=child_env(1), cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        rss.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"  rss: {rss[-1]}", flush=True)
        if rows < n:
            shutil.rmtree(target, ignore_errors=True)
    growth = rss[-1]["increase_mb"] - rss[0]["increase_mb"] if len(rss) > 1 else None
    report: dict[str, Any] = {
        "settings": {"n_query": nq, "rows": n, "dim": dim, "k": args.k, "repeats": args.repeats,
                     "mm_rows": mm_rows, "cpu": cpu_name(), "threads": 1, "torch": torch.__version__},  # fmt: skip
        "wall_s": timed.wall,
        "cpu_s": timed.cpu,
        "median_s": med,
        "rows_per_s": rows_per_s,
        "stream_x_mm": ratio,
        "goal_met": ratio >= GOAL,
        "rss": rss,
        "rss_growth_mb": growth,
        "rss_note": "increase of VmHWM over the RSS after opening the cache and loading the queries",
    }
    emit_report(report, args.json_out)


if __name__ == "__main__":
    main()
