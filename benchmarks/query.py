"""Scan throughput of streaming top-k over an on-disk gradient cache vs a numpy matmul in RAM.

A synthetic cache (``--rows`` x ``--dim`` standard-normal fp16 rows, ``--shard-size`` rows per
shard) is written with the library's own ``CacheWriter`` (safetensors shards, checksums, manifest:
exactly what the attribution pass writes) into a temp directory, which is deleted at the end unless
``--keep``. Then, for each n_query (random fp32 queries) and k:

- ``stream (library)``: ``hf_grass.scoring.topk_scores(GradientCache(path), queries, k)`` as is:
  the scan memory-maps each shard, converts its fp16 rows ``scoring.chunk_rows(n_query, dim)`` at a
  time into one reused fp32 buffer (64 rows at dim 4096 for n_query <= 8, 256 above), multiplies
  and merges into the running top-k.
- ``numpy fp32``: every row loaded up front into a float32 numpy array, ``queries @ data.T`` then
  ``np.argpartition`` top-k (sorted): the in-RAM baseline of the goal.
- ``torch fp32``: the same in-RAM array through ``torch.topk(q @ data.T)`` (the streaming path's
  arithmetic without I/O, conversion or merging: where the gap to numpy comes from).
- ``numpy fp16``: in-RAM fp16 rows, ``q16 @ data16.T`` (numpy has no fp16 BLAS, so this is a C
  loop); timed on the first ``--fp16-rows / n_query`` rows only and reported as rows/s.
- ``convert only (chunk C)``: the scan's conversion alone, **replicated** here (``convert_only``,
  not a call into the scan, whose matmul would be timed too): shard mmap + fp16 rows ``copy_``-ed C
  at a time into one reused fp32 buffer, no matmul or merge. C = ``scoring.chunk_rows(n_query,
  dim)`` for each n_query.

Variants are interleaved per repetition (``benchmarks._common.time_interleaved``); medians are
reported. All scan numbers are **warm** (the shards are in the page cache); one **cold** scan after
``posix_fadvise(DONTNEED)`` on every shard is reported separately. Throughput is rows scanned per
second; every streaming top-k is checked against numpy's before it is timed. The peak RSS of a
library scan is measured in a fresh subprocess per cache size (``VmHWM`` from ``/proc/self/status``).

    python -m benchmarks.query                        # 200k x 4096 fp16 (1.6 GB), n_query 1 8 32, k=10
    python -m benchmarks.query --quick                # 20k rows, RSS at 5k/10k/20k (< 1 min)
    python -m benchmarks.query --smoke                # 2048 rows of 256, once: checks that it runs
    python -m benchmarks.query --rows 100000 --json-out q.json --keep

Goals: streaming >= 0.7x the in-RAM numpy fp32 throughput at each n_query, peak RSS independent of
the cache size. Measured numbers, with their commands, are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hf_grass.scoring as scoring
from benchmarks._common import REPO_ROOT, cpu_name, emit_report, parse_with_smoke, time_interleaved
from hf_grass.cache.manifest import MANIFEST, load_json
from hf_grass.cache.reader import GradientCache
from hf_grass.cache.writer import CacheWriter, ShardContent
from hf_grass.config import GraSSConfig

GOAL_RATIO = 0.7  # streaming / in-RAM numpy fp32
MODULE_DIM = 1024  # the synthetic cache's "modules" (dim / MODULE_DIM of them, like proj_dim=1024)
SMOKE = {"rows": 2048, "dim": 256, "shard_size": 512, "n_queries": [1, 4], "repeats": 1,
         "rss_rows": [1024, 2048], "fp16_rows": 256}  # fmt: skip


@dataclass
class Measurement:
    """One variant at one n_query (``n_query`` 0: independent of the queries)."""

    variant: str
    n_query: int
    rows: int
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    rows_per_s: float | None = None
    gb_per_s: float | None = None  # fp16 bytes of the scanned rows per second
    x_numpy_fp32: float | None = None
    cpu_times_s: list[float] = field(default_factory=list)  # process CPU time
    cpu_median_s: float | None = None
    cpu_rows_per_s: float | None = None
    cpu_x_numpy_fp32: float | None = None
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="cached rows (default 200000, quick 20000)")
    parser.add_argument("--dim", type=int, default=4096, help="row width (default 4096)")
    parser.add_argument(
        "--shard-size", type=int, default=None, help="rows per shard (default: GraSSConfig's, 1024)"
    )
    parser.add_argument("--n-queries", type=int, nargs="+", default=[1, 8, 32], help="default 1 8 32")
    parser.add_argument("--k", type=int, default=10, help="top-k (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed scans per variant (default 5)")
    parser.add_argument(
        "--rss-rows",
        type=int,
        nargs="*",
        default=None,
        help="cache sizes for the peak-RSS scans (default rows/4 rows/2 rows; none to skip)",
    )
    parser.add_argument(
        "--fp16-rows",
        type=int,
        default=4000,
        help="rows x n_query for the numpy fp16 matmul (it runs on rows / n_query rows), 0 to skip "
        "(default 4000)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenBLAS threads (default 1)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="parent of the temp cache dir (default $TMPDIR)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the cache directory")
    parser.add_argument("--quick", action="store_true", help="20k rows, 3 repeats")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")
    # internal: the peak-RSS child process
    parser.add_argument("--child-scan", type=Path, default=None, help=argparse.SUPPRESS)
    args = parse_with_smoke(parser, argv, SMOKE)
    args.rows = args.rows or (20000 if args.quick else 200000)
    args.repeats = args.repeats if not args.quick or args.repeats != 5 else 3
    args.shard_size = args.shard_size or GraSSConfig().shard_size
    if args.rss_rows is None:
        args.rss_rows = [args.rows // 4, args.rows // 2, args.rows]
    for name in ("rows", "dim", "shard_size", "k", "repeats", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if any(n <= 0 for n in args.n_queries + args.rss_rows):
        parser.error("--n-queries and --rss-rows must be positive")
    if args.k > min([args.rows] + args.rss_rows):
        parser.error("--k must not exceed the number of rows")
    if args.fp16_rows < 0:
        parser.error("--fp16-rows must be >= 0")
    return args


def child_env(threads: int) -> dict[str, str]:
    """This environment with BLAS threads pinned and the repo importable (for ``-m benchmarks.query``)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


# ---- the synthetic cache ----------------------------------------------------------------------------


def write_cache(path: Path, rows: int, dim: int, shard_size: int) -> dict[str, Any]:
    """A complete cache of ``rows`` random fp16 rows, written shard by shard with ``CacheWriter``."""
    config = GraSSConfig(
        proj_dim=MODULE_DIM, dtype="float16", shard_size=shard_size, preconditioner="identity"
    )
    n_modules = dim // MODULE_DIM if dim % MODULE_DIM == 0 else 1
    width = dim // n_modules
    modules = [
        {
            "name": f"synthetic.{i}",
            "d_in": width,
            "d_out": width,
            "bias": False,
            "offset": i * width,
            "dim": width,
        }
        for i in range(n_modules)
    ]
    header = {
        "model": {"class": "Synthetic", "name_or_path": None, "revision": None},
        "modules": modules,
        "dim": dim,
        "layout": "module",
        "num_examples": rows,
        "dataset": f"synthetic-randn-{rows}x{dim}-seed0",
        "library_version": "benchmark",
    }
    gen = torch.Generator().manual_seed(0)
    writer = CacheWriter(path, config, header)
    start = time.perf_counter()
    try:
        for shard, first in enumerate(range(0, rows, shard_size)):
            n = min(shard_size, rows - first)
            block = torch.randn(n, dim, generator=gen).to(torch.float16)
            indices = list(range(first, first + n))
            docs = [{"index": i, "text": None, "id": None} for i in indices]
            writer.commit_shard(shard, ShardContent(indices, block, docs))
        writer.finish(complete=True)
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "bytes": rows * dim * 2,
        "seconds": seconds,
        "mb_per_s": rows * dim * 2 / seconds / 1e6,
    }


def prefix_cache(src: Path, dst: Path, rows: int) -> int:
    """``dst``: the first shards of ``src`` holding ``rows`` rows (rounded up to whole shards),
    hard-linked, with the manifest cut to them. Returns the number of rows."""
    manifest = load_json(src / MANIFEST)
    shards, total = [], 0
    for shard in manifest["shards"]:
        if total >= rows:
            break
        shards.append(shard)
        total += shard["rows"]
    (dst / "shards").mkdir(parents=True)
    for shard in shards:
        for key in ("file", "docs"):
            try:
                os.link(src / shard[key], dst / shard[key])
            except OSError:
                shutil.copyfile(src / shard[key], dst / shard[key])
    manifest.update(shards=shards, num_examples=total, num_rows=total, complete=True)
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return total


def drop_page_cache(cache: GradientCache) -> None:
    """Best effort: ask the kernel to evict the (clean) shard pages."""
    for path in cache.rows.paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_numpy(cache: GradientCache, dtype: np.dtype, rows: int | None = None) -> np.ndarray:
    """The first ``rows`` rows (all by default) in one preallocated array, shard by shard."""
    total = cache.num_rows if rows is None else min(rows, cache.num_rows)
    out = np.empty((total, cache.dim), dtype=dtype)
    pos = 0
    for _, grads in cache.rows.iter_shards():
        if pos >= total:
            break
        n = min(grads.shape[0], total - pos)
        out[pos : pos + n] = grads[:n].numpy()
        pos += n
    return out


# ---- the scans ----------------------------------------------------------------------------------------


def numpy_topk(queries: np.ndarray, data: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted top-k (scores, row positions) of ``queries @ data.T``."""
    scores = queries @ data.T
    part = np.argpartition(scores, -k, axis=1)[:, -k:]
    top = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-top, axis=1)
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1)


def stream(cache: GradientCache, queries: torch.Tensor, k: int) -> scoring.TopK:
    """The library's streaming top-k, as a user's query runs it."""
    return scoring.topk_scores(cache, queries, k)


def convert_only(cache: GradientCache, chunk: int) -> None:
    """The scan's conversion alone: shard mmap, fp16 rows copied ``chunk`` at a time into one
    reused fp32 buffer, replicated here without the matmul or the merge. ``chunk`` is
    ``scoring.chunk_rows(n_query, dim)``."""
    buf = torch.empty(chunk, cache.dim, dtype=torch.float32)
    for _, grads in cache.rows.iter_shards():
        for start in range(0, grads.shape[0], chunk):
            stop = min(start + chunk, grads.shape[0])
            buf[: stop - start].copy_(grads[start:stop])


def child_scan(args: argparse.Namespace) -> None:
    """Subprocess entry: open the cache, one streaming scan, print peak-RSS figures as JSON."""
    torch.set_num_threads(args.threads)
    cache = GradientCache(args.child_scan)
    queries = torch.randn(max(args.n_queries), cache.dim, generator=torch.Generator().manual_seed(1))
    before = proc_status()
    start = time.perf_counter()
    scoring.topk_scores(cache, queries, args.k)
    seconds = time.perf_counter() - start
    after = proc_status()
    print(json.dumps({"rows": cache.num_rows, "seconds": seconds, "before": before, "after": after}))


def proc_status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process in kB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def measure_rss(path: Path, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of one library scan (``scoring.topk_scores`` as is) in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.query", "--child-scan", str(path), "--k", str(args.k)]
    cmd += ["--n-queries", str(max(args.n_queries))]
    cmd += ["--threads", str(args.threads), "--rss-rows", "--rows", str(rows)]
    proc = subprocess.run(cmd, env=child_env(args.threads), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child failed:\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    before, after = data["before"], data["after"]
    return {
        "variant": "stream (library)",
        "rows": data["rows"],
        "gb_fp16": data["rows"] * args.dim * 2 / 1e9,
        "n_query": max(args.n_queries),
        "scan_s": data["seconds"],
        "vmhwm_before_mb": before["VmHWM"] / 1024,
        "vmhwm_after_mb": after["VmHWM"] / 1024,
        "scan_peak_increase_mb": (after["VmHWM"] - before["VmHWM"]) / 1024,
        "rss_file_after_mb": after["RssFile"] / 1024,
    }


def scan_benchmark(cache: GradientCache, args: argparse.Namespace) -> list[Measurement]:
    """Cold scan, then the interleaved warm scans per n_query; the in-RAM copies live only here."""
    rows = cache.num_rows
    measurements: list[Measurement] = []

    # cold: one library scan after evicting the shards from the page cache
    q0 = torch.randn(args.n_queries[0], args.dim, generator=torch.Generator().manual_seed(1))
    drop_page_cache(cache)
    start = time.perf_counter()
    stream(cache, q0, args.k)
    cold = Measurement("stream (library, cold)", args.n_queries[0], rows, [time.perf_counter() - start])
    cold.note = "after posix_fadvise(DONTNEED); one scan"
    print(f"  cold scan: {cold.times_s[0]:.2f}s", flush=True)

    start = time.perf_counter()
    data32 = load_numpy(cache, np.dtype(np.float32))
    data16 = load_numpy(cache, np.dtype(np.float16), args.fp16_rows) if args.fp16_rows else None
    print(f"  loaded the in-RAM copies in {time.perf_counter() - start:.1f}s", flush=True)
    t32 = torch.from_numpy(data32)
    # conversion chunk sizes: the library's for each n_query
    convert_chunks = list(dict.fromkeys(scoring.chunk_rows(nq, args.dim) for nq in args.n_queries))
    for nq in args.n_queries:
        queries = torch.randn(nq, args.dim, generator=torch.Generator().manual_seed(nq))
        q32 = queries.numpy()
        # the streaming top-k must agree with numpy's (fp32 products of the same fp16 values)
        ref_scores, _ = numpy_topk(q32, data32, args.k)
        got = stream(cache, queries, args.k)
        if not np.allclose(got.scores.numpy(), ref_scores, rtol=1e-4, atol=1e-3):
            raise RuntimeError(f"n_query={nq}: streaming top-k differs from numpy's")
        calls: dict[str, Callable[[], Any]] = {
            "stream (library)": lambda q=queries: stream(cache, q, args.k),
        }
        calls["numpy fp32 in RAM"] = lambda q=q32: numpy_topk(q, data32, args.k)
        calls["torch fp32 in RAM"] = lambda q=queries: torch.topk(q @ t32.T, args.k, dim=1)
        if data16 is not None:  # ~ the same time per call for every n_query: rows / n_query
            q16, sub16 = q32.astype(np.float16), data16[: max(64, args.fp16_rows // nq)]
            calls["numpy fp16 in RAM"] = lambda q=q16, d=sub16: numpy_topk(q, d, args.k)
        if nq == args.n_queries[0]:  # query-independent diagnostic, once
            for chunk in convert_chunks:
                calls[f"convert only (chunk {chunk})"] = lambda c=chunk: convert_only(cache, c)
        start = time.perf_counter()
        timed = time_interleaved(calls, args.repeats)
        times, cpu = timed.wall, timed.cpu
        print(
            f"  n_query={nq} (library chunk {scoring.chunk_rows(nq, args.dim)}): {time.perf_counter() - start:.1f}s",
            flush=True,
        )
        batch: list[Measurement] = []
        for name, ts in times.items():
            fp16 = name.startswith("numpy fp16")
            scanned = min(rows, max(64, args.fp16_rows // nq)) if fp16 else rows
            m = Measurement(name, 0 if "convert only" in name else nq, scanned, ts, cpu_times_s=cpu[name])
            if name == "stream (library)":
                m.note = f"chunk_rows({nq}, {args.dim}) = {scoring.chunk_rows(nq, args.dim)}"
            if fp16:
                m.note = f"first {scanned} rows only (no fp16 BLAS)"
            batch.append(m)
        if nq == args.n_queries[0]:
            batch.append(cold)
        for m in batch:
            m.median_s = statistics.median(m.times_s)
            m.rows_per_s = m.rows / m.median_s
            m.gb_per_s = m.rows * args.dim * 2 / m.median_s / 1e9
            if m.cpu_times_s:
                m.cpu_median_s = statistics.median(m.cpu_times_s)
                m.cpu_rows_per_s = m.rows / m.cpu_median_s
        ref = next(m for m in batch if m.variant == "numpy fp32 in RAM")
        for m in batch:
            m.x_numpy_fp32 = m.rows_per_s / ref.rows_per_s
            if m.cpu_rows_per_s and ref.cpu_rows_per_s:
                m.cpu_x_numpy_fp32 = m.cpu_rows_per_s / ref.cpu_rows_per_s
        measurements += batch
    return measurements


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"


def print_tables(measurements: list[Measurement], rss: list[dict[str, Any]]) -> None:
    head = ["n_query", "variant", "rows", "wall s", "rows/s", "GB/s", "x numpy", "cpu s", "rows/s", "x numpy"]
    widths = [7, 32, 6, 7, 7, 5, 7, 7, 7, 7]
    line = lambda cells: "  ".join(
        c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    print(line(["", "", "", "", "wall", "clock", "", "process", "CPU", "time"]))
    print(line(head))
    for m in measurements:
        cells = [str(m.n_query) if m.n_query else "-", m.variant, str(m.rows), fmt(m.median_s, ".3f")]
        cells += [fmt_rate(m.rows_per_s), fmt(m.gb_per_s, ".2f"), fmt(m.x_numpy_fp32, ".2f")]
        cells += [fmt(m.cpu_median_s, ".3f"), fmt_rate(m.cpu_rows_per_s), fmt(m.cpu_x_numpy_fp32, ".2f")]
        print(line(cells) + (f"   {m.note}" if m.note else ""))
    print("GB/s: fp16 bytes of the scanned rows per second; x numpy: throughput / numpy fp32 in RAM's")
    if rss:
        print("\npeak RSS of one streaming scan (n_query = the largest), fresh process per cache size:")
        print(
            f"{'variant':<28}  {'rows':>7}  {'GB fp16':>7}  {'scan s':>6}  {'VmHWM before':>12}  "
            f"{'VmHWM after':>11}  {'scan peak +':>11}"
        )
        for r in rss:
            print(
                f"{r['variant']:<28}  {r['rows']:>7}  {r['gb_fp16']:>7.2f}  {r['scan_s']:>6.2f}  "
                f"{r['vmhwm_before_mb']:>9.0f} MB  {r['vmhwm_after_mb']:>8.0f} MB  {r['scan_peak_increase_mb']:>8.0f} MB"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child_scan is not None:
        child_scan(args)
        return {}
    if argv is None and os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):
        # numpy's OpenBLAS reads its thread count at import: restart with it pinned
        os.execve(
            sys.executable, [sys.executable, "-m", "benchmarks.query", *sys.argv[1:]], child_env(args.threads)
        )
    torch.set_num_threads(args.threads)
    settings: dict[str, Any] = {
        "rows": args.rows,
        "dim": args.dim,
        "shard_size": args.shard_size,
        "dtype": "float16",
        "n_queries": args.n_queries,
        "k": args.k,
        "repeats": args.repeats,
        "library_chunk_rows": {str(nq): scoring.chunk_rows(nq, args.dim) for nq in args.n_queries},
        "threads": args.threads,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu": cpu_name(),
        "page_cache": "warm (second and later scans); one cold scan reported separately",
    }
    root = Path(tempfile.mkdtemp(prefix="hf-grass-query-bench-", dir=args.dir))
    print(
        f"cache {args.rows} x {args.dim} fp16 ({args.rows * args.dim * 2 / 1e9:.2f} GB), shards of {args.shard_size}, "
        f"k={args.k}, n_query {args.n_queries}, {args.threads} thread(s), median of {args.repeats}, in {root}",
        flush=True,
    )
    measurements: list[Measurement] = []
    rss: list[dict[str, Any]] = []
    try:
        path = root / "cache"
        written = write_cache(path, args.rows, args.dim, args.shard_size)
        print(f"  wrote {written['bytes'] / 1e9:.2f} GB in {written['seconds']:.1f}s", flush=True)
        cache = GradientCache(path)
        rows = cache.num_rows
        measurements = scan_benchmark(cache, args)

        for n in args.rss_rows:
            if n >= rows:
                sub, actual = path, rows
            else:
                sub = root / f"prefix-{n}"
                actual = prefix_cache(path, sub, n)
            rss.append(measure_rss(sub, actual, args))
            print(f"  RSS at {actual} rows: +{rss[-1]['scan_peak_increase_mb']:.0f} MB", flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print_tables(measurements, rss)
    goal_rows = []
    for nq in args.n_queries:
        lib = next(m for m in measurements if m.n_query == nq and m.variant == "stream (library)")
        row: dict[str, Any] = {
            "n_query": nq,
            "target": GOAL_RATIO,
            "chunk_rows": scoring.chunk_rows(nq, args.dim),
        }
        for clock, ratio in (("wall", lib.x_numpy_fp32), ("cpu", lib.cpu_x_numpy_fp32)):
            row[clock] = {"ratio": ratio, "met": ratio is not None and ratio >= GOAL_RATIO}
        goal_rows.append(row)
    for g in goal_rows:
        for clock in ("wall", "cpu"):
            v = g[clock]
            print(
                f"goal stream (library) >= {GOAL_RATIO}x numpy fp32 in RAM, n_query={g['n_query']}, {clock} clock: "
                f"{v['ratio']:.2f}x -> {'met' if v['met'] else 'NOT met'}"
            )
    rss_goal: dict[str, Any] | None = None
    if len(rss) > 1:
        # a scan holding anything per cached row would grow by ~ the added fp16 bytes; allow 5% of it
        incs = [r["scan_peak_increase_mb"] for r in rss]
        growth = rss[-1]["scan_peak_increase_mb"] - rss[0]["scan_peak_increase_mb"]
        added_mb = (rss[-1]["gb_fp16"] - rss[0]["gb_fp16"]) * 1e3
        rss_goal = {
            "increase_mb": incs,
            "rows": [r["rows"] for r in rss],
            "growth_mb": growth,
            "added_cache_mb": added_mb,
            "tolerance": "growth <= 5% of the added fp16 cache bytes",
            "met": growth <= 0.05 * added_mb,
        }
        print(
            f"goal RSS independent of the cache size: scan peak increase "
            f"{' / '.join(f'{i:.0f}' for i in incs)} MB at {' / '.join(str(r['rows']) for r in rss)} rows "
            f"(growth {growth:+.0f} MB over +{added_mb:.0f} MB of cache) -> "
            f"{'met' if rss_goal['met'] else 'NOT met'}"
        )
    report = {
        "settings": settings,
        "write": written,
        "measurements": [asdict(m) for m in measurements],
        "rss": rss,
        "goals": goal_rows,
        "rss_goal": rss_goal,
    }
    return emit_report(report, args.json_out)


if __name__ == "__main__":
    main()
