"""The FAISS index of a cache: which kind, and the two-stage lookup against the exact scan.

Rows: a cache written by ``benchmarks/real_rows.py`` (real FactGraSS/EK-FAC rows of a tiny GPT-2
over generated documents, with its query vectors), and a cache of standard-normal fp16 rows of the
same size and width (the worst case: no structure for an index to use), written here with
``CacheWriter``. One thread everywhere (torch and FAISS).

1. **Choice** on the first ``--choice-rows`` rows (hard-linked prefix of the real cache): ``flat``,
   ``ivfpq`` and ``hnsw`` built with the library defaults (rows wider than 1024 are indexed as their
   1024-wide projection; then also ``ivfpq`` of the rows themselves, ``projection=0``, and of a
   projection without principal directions, ``principal=0``); build time,
   index bytes, recall@10 of the two-stage lookup (helpful and harmful lists) against the exact
   scan, median latency of one query and the peak RSS of the lookups.
2. **Targets** at the full size with the chosen kind (``--kind``, default ``auto``): recall@10 ≥
   0.95, median latency ≤ 100 ms and ≥ 50× faster than the exact scan, index RAM ≤ 10 % of the
   cache, over a sweep of ``candidates`` (rows re-scored per list) and ``nprobe``; and the same
   index without its norm shortlist (``shortlist=0``), side by side.
3. The same at full size on the random rows.
4. A diagnosis of the real rows (first 10^5): the norm tail, the share of the exact top-10 and
   bottom-10 among the 1 % largest norms, the share of the queries' energy in the rows' top-128
   principal directions, the mean cosine of the top-10 and bottom-10 (``--diagnose-only``).

Latency is one ``hf_grass.scoring.lookup`` call (index search for ``q`` and ``-q``, reading the
candidates' rows, exact re-score, top-10 and bottom-10) per query, warm page cache; the exact scan
is ``scoring.scan`` with top and bottom. Variants are interleaved query by query. Index RAM is the
serialised index (what ``load_index`` deserialises), and the process RSS increase on loading it.

    python -m benchmarks.real_rows --out /tmp/rows1m --docs 1000000
    python -m benchmarks.index --rows-dir /tmp/rows1m --json-out index.json
    python -m benchmarks.index --rows-dir /tmp/rows20k --choice-rows 10000 --quick
    python -m benchmarks.index --rows-dir /tmp/rows-smoke --smoke     # real_rows --smoke's rows: checks it runs
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from benchmarks._common import cpu_name, emit_report, parse_with_smoke
from benchmarks.query import prefix_cache
from hf_grass.cache.index import DEFAULT_PROJECTION
from hf_grass.cache.reader import GradientCache
from hf_grass.cache.writer import CacheWriter, ShardContent, encode_rows
from hf_grass.scoring import Search, lookup, scan

K = 10
SMOKE = {"choice_rows": 512, "queries": 8, "latency_queries": 2, "exact_repeats": 1, "quick": True}


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return status_mb("VmRSS")


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def cache_bytes(cache: GradientCache) -> int:
    return sum(p.stat().st_size for p, _ in cache.files() if p.is_file() and "index/" not in p.as_posix())


def random_cache(path: Path, like: GradientCache) -> GradientCache:
    """Standard-normal rows, as many and as wide as ``like``'s, same config (storage dtype) and shard size."""
    if (path / "manifest.json").is_file():
        return GradientCache(path)
    header = {
        "model": {"class": "Synthetic"},
        "modules": like.modules,
        "dim": like.dim,
        "layout": like.manifest["layout"],
        "num_examples": like.num_rows,
        "dataset": f"randn-{like.num_rows}x{like.dim}",
    }
    gen = torch.Generator().manual_seed(0)
    size = like.config.shard_size
    writer = CacheWriter(path, like.config, header)
    for shard, first in enumerate(range(0, like.num_rows, size)):
        idx = list(range(first, min(first + size, like.num_rows)))
        rows, scales = encode_rows(torch.randn(len(idx), like.dim, generator=gen), like.dtype)
        docs = [{"index": i, "text": None, "id": None} for i in idx]
        writer.commit_shard(shard, ShardContent(idx, rows, docs, scales=scales))
    writer.finish(complete=True)
    writer.close()
    return GradientCache(path)


def recall(got: torch.Tensor, want: torch.Tensor) -> float:
    hits = [len(set(a.tolist()) & set(b.tolist())) / want.shape[1] for a, b in zip(got, want)]
    return float(np.mean(hits))


def evaluate(
    cache: GradientCache,
    queries: torch.Tensor,
    exact: Any,
    settings: list[dict[str, Any]],
    latency_queries: int,
    exact_latency: list[float],
) -> list[dict[str, Any]]:
    """Recall and latency of each two-stage setting (``candidates``, search params)."""
    out = []
    for s in settings:
        got = lookup(cache, queries, K, top=True, bottom=True, search=Search("index", s["candidates"], s["params"]))
        out.append(
            {
                **s,
                "recall_top": recall(got.top.indices, exact.top.indices),
                "recall_bottom": recall(got.bottom.indices, exact.bottom.indices),
                "latency_s": [],
                "cpu_s": [],
            }
        )
    gc.collect()
    before = rss_mb()
    reset_peak_rss()
    for i in range(latency_queries):  # interleaved, one query at a time
        q = queries[i % queries.shape[0] : i % queries.shape[0] + 1]
        for s, row in zip(settings, out):
            start, start_cpu = time.perf_counter(), time.process_time()
            lookup(cache, q, K, top=True, bottom=True, search=Search("index", s["candidates"], s["params"]))
            row["latency_s"].append(time.perf_counter() - start)
            row["cpu_s"].append(time.process_time() - start_cpu)
    # the lookups' peak RSS over the RSS before them (the index loaded, the pages of the shards they
    # read included: memory-mapped pages count once touched)
    peak = status_mb("VmHWM") - before
    exact_median = statistics.median(exact_latency)
    for row in out:
        row["median_latency_ms"] = statistics.median(row["latency_s"]) * 1e3
        row["x_faster_than_exact"] = exact_median / statistics.median(row["latency_s"])
        # this process's CPU time per lookup: on a shared machine the wall clock also counts the time
        # other processes held the core (and page-cache misses)
        row["median_cpu_ms"] = statistics.median(row["cpu_s"]) * 1e3
        row["lookups_peak_rss_increase_mb"] = peak
        del row["latency_s"], row["cpu_s"]
    return out


def exact_reference(cache: GradientCache, queries: torch.Tensor, repeats: int) -> tuple[Any, list[float]]:
    """Exact lists for every query (one batched scan) and the latency of single-query scans."""
    start = time.perf_counter()
    exact = scan(cache, queries, K, top=True, bottom=True)
    print(f"  exact lists of {queries.shape[0]} queries: {time.perf_counter() - start:.1f}s", flush=True)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        scan(cache, queries[i : i + 1], K, top=True, bottom=True)
        times.append(time.perf_counter() - start)
    print(f"  exact scan of one query: median {statistics.median(times):.2f}s", flush=True)
    return exact, times


def build(cache: GradientCache, kind: str, **kw: Any) -> dict[str, Any]:
    start = time.perf_counter()
    entry = cache.build_index(kind, rebuild=True, **kw)
    label = entry["kind"] + ("" if entry["shortlist_rows"] else " (no shortlist)")
    if entry.get("projection") is None and cache.dim > DEFAULT_PROJECTION:
        label += " (full width)"
    elif entry.get("projection") and not entry["projection"]["principal"]:
        label += " (no principal directions)"
    seconds = time.perf_counter() - start
    gc.collect()
    before = rss_mb()
    cache.__dict__.pop("_faiss", None)
    cache.index()
    gc.collect()
    info = {
        "kind": label,
        "factory": entry["factory"],
        "projection": entry.get("projection"),
        "shortlist_rows": entry["shortlist_rows"],
        "build_s": seconds,
        "index_bytes": entry["bytes"],
        "rss_increase_mb": rss_mb() - before,
        "cache_bytes": cache_bytes(cache),
        "default_search": entry["search"],
    }
    info["index_fraction_of_cache"] = info["index_bytes"] / info["cache_bytes"]
    width = (entry.get("projection") or {}).get("width", cache.dim)
    print(f"  built {label} ({entry['factory']} over {width} numbers per row) in {seconds:.0f}s: "
          f"{entry['bytes'] / 1e6:.1f} MB ({100 * info['index_fraction_of_cache']:.1f}% of the cache), "
          f"+{info['rss_increase_mb']:.0f} MB RSS loaded", flush=True)  # fmt: skip
    return info


def sweep(factory: str, quick: bool) -> list[dict[str, Any]]:
    cands = [300, 1000]
    if factory.startswith("IVF"):
        probes = [16, 64] if quick else [64, 128, 256]
        return [{"candidates": c, "params": {"nprobe": p}} for p in probes for c in cands]
    if factory.startswith("HNSW"):  # more candidates than efSearch finds add nothing: 300
        return [{"candidates": 300, "params": {"efSearch": e}} for e in ([512] if quick else [512, 2048, 4096])]
    return [{"candidates": c, "params": None} for c in cands[:1]]


def section(
    name: str, cache: GradientCache, queries: torch.Tensor, kinds: list[tuple[str, dict[str, Any]]], args: argparse.Namespace
) -> dict[str, Any]:
    print(f"{name}: {cache.num_rows} x {cache.dim} rows, {queries.shape[0]} queries", flush=True)
    exact, exact_times = exact_reference(cache, queries, args.exact_repeats)
    result: dict[str, Any] = {"rows": cache.num_rows, "dim": cache.dim, "exact_latency_s": exact_times,
                              "exact_median_latency_ms": statistics.median(exact_times) * 1e3, "kinds": []}  # fmt: skip
    for kind, kw in kinds:
        info = build(cache, kind, **kw)
        info["settings"] = evaluate(cache, queries, exact, sweep(info["factory"], args.quick), args.latency_queries,
                                    exact_times)  # fmt: skip
        for row in info["settings"]:
            print(f"    {kind} candidates={row['candidates']} {row['params']}: recall@10 top "
                  f"{row['recall_top']:.3f} bottom {row['recall_bottom']:.3f}, "
                  f"{row['median_latency_ms']:.1f} ms (cpu {row['median_cpu_ms']:.1f} ms, "
                  f"{row['x_faster_than_exact']:.0f}x), peak RSS +{row['lookups_peak_rss_increase_mb']:.0f} MB",
                  flush=True)  # fmt: skip
        result["kinds"].append(info)
    return result


def diagnose(cache: GradientCache, queries: torch.Tensor, rows: int) -> dict[str, Any]:
    """Why the rows are hard for an index: norm tail, where the queries' energy lies, how extreme the
    top and bottom scores are (on the first ``rows`` rows)."""
    rows = min(rows, (1 << 30) // (4 * cache.dim))  # at most 1 GB of float32 rows (8456 of 31,744)
    x = torch.cat([b.rows.clone() for b in cache.rows.iter_row_blocks(1 << 12, shards=list(range(len(cache.shards))))
                   if b.start < rows])[:rows]  # fmt: skip
    norms = x.norm(dim=1)
    scores = queries @ x.T
    top, bottom = scores.topk(K, dim=1).indices, scores.topk(K, dim=1, largest=False).indices
    heavy = torch.zeros(x.shape[0], dtype=torch.bool)
    heavy[norms.topk(max(1, x.shape[0] // 100)).indices] = True
    svd_rows = min(20000, (1 << 28) // (4 * cache.dim))  # the principal directions of the first rows
    _, sv, vh = torch.linalg.svd(x[:svd_rows], full_matrices=False)
    energy = sv**2 / (sv**2).sum()
    qn = queries / queries.norm(dim=1, keepdim=True)
    cos = scores / (queries.norm(dim=1, keepdim=True) * norms)
    out = {
        "rows": x.shape[0],
        "svd_rows": min(svd_rows, x.shape[0]),
        "norm_max_over_median": float(norms.max() / norms.median()),
        "top10_in_largest_1pct_norms": float(heavy[top].float().mean()),
        "bottom10_in_largest_1pct_norms": float(heavy[bottom].float().mean()),
        "row_energy_in_top128_pca": float(energy[:128].sum()),
        "query_energy_in_top128_pca": float(((qn @ vh[:128].T) ** 2).sum(1).mean()),
        "mean_cos_top10": float(cos.gather(1, top).mean()),
        "mean_cos_bottom10": float(cos.gather(1, bottom).mean()),
    }
    print(f"diagnosis on {out['rows']} rows: {out}", flush=True)
    return out


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for info in res["kinds"]:
        for row in info["settings"]:
            met = (
                min(row["recall_top"], row["recall_bottom"]) >= 0.95
                and row["median_latency_ms"] <= 100
                and row["x_faster_than_exact"] >= 50
                and info["index_fraction_of_cache"] <= 0.10
            )
            out.append({"kind": info["kind"], "candidates": row["candidates"], "params": row["params"], "all_met": met})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows-dir", type=Path, required=True, help="output folder of benchmarks.real_rows")
    parser.add_argument("--work", type=Path, default=None, help="where the prefix and random caches go")
    parser.add_argument("--choice-rows", type=int, default=100_000)
    parser.add_argument("--kind", default="auto", help="the kind measured at full size (default: the library's, auto)")
    parser.add_argument("--queries", type=int, default=100, help="queries for recall (default 100)")
    parser.add_argument("--latency-queries", type=int, default=30)
    parser.add_argument("--exact-repeats", type=int, default=5)
    parser.add_argument("--skip-random", action="store_true")
    parser.add_argument("--choice-kinds", default=None,
                        help="only these kinds in the choice section, comma-separated (e.g. hnsw-sq8,flat)")  # fmt: skip
    parser.add_argument("--diagnose-only", action="store_true", help="only the diagnosis of the real rows")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parse_with_smoke(parser, argv, SMOKE)
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    work = args.work or args.rows_dir / "index_bench"
    work.mkdir(parents=True, exist_ok=True)
    full = GradientCache(args.rows_dir / "cache")
    queries = load_file(str(args.rows_dir / "queries.safetensors"))["queries"][: args.queries]
    report: dict[str, Any] = {
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "cpu": cpu_name(), "threads": 1,
                     "torch": torch.__version__, "faiss": faiss.__version__, "k": K},  # fmt: skip
    }
    report["diagnosis"] = diagnose(full, queries, min(args.choice_rows, 100_000))
    if args.diagnose_only:
        emit_report(report, args.json_out)
        return
    prefix_dir = work / f"prefix-{args.choice_rows}"
    if args.choice_rows < full.num_rows:
        shutil.rmtree(prefix_dir, ignore_errors=True)
        prefix_cache(full.path, prefix_dir, args.choice_rows)
        kinds = [("flat", {}), ("ivfpq", {}), ("hnsw-sq8", {}), ("hnsw", {}), ("ivfpq", {"shortlist": 0.0})]
        if full.dim > DEFAULT_PROJECTION:  # wide rows: the rows themselves, and a projection without
            kinds += [("ivfpq", {"projection": 0}), ("ivfpq", {"principal": 0})]  # principal directions
        if args.choice_kinds:
            kinds = [(k, kw) for k, kw in kinds if k in args.choice_kinds.split(",") and not kw]
        report["choice"] = section("choice", GradientCache(prefix_dir), queries, kinds, args)
        shutil.rmtree(prefix_dir, ignore_errors=True)
    full_kinds = [(args.kind, {}), (args.kind, {"shortlist": 0.0})]
    report["real"] = section("real rows", full, queries, full_kinds, args)
    report["real_goals"] = goals(report["real"])
    if not args.skip_random:
        rand = random_cache(work / "random", full)
        rq = torch.randn(queries.shape[0], full.dim, generator=torch.Generator().manual_seed(1))
        report["random"] = section("random rows", rand, rq, [(args.kind, {})], args)
        report["random_goals"] = goals(report["random"])
    emit_report(report, args.json_out)


if __name__ == "__main__":
    main()
