"""The process-group section of ``benchmarks.gpu_suite``, run in a child process (a hung NCCL
initialisation cannot be interrupted from Python; the parent kills the child at its deadline).

A single-process group (world size 1) runs no collective by itself: ``Distributed.active`` is
``world_size > 1``. ``OneRankGroup`` therefore forces them on, so the build's barriers, the
warm-up's all-reduce of its float64 covariance sums and the error agreement all go through the
backend: with NCCL, every tensor is copied to the GPU and back (``Distributed._send``), which is the
path the CPU tests cannot take. The cache built that way, and the exact query of it, are compared
with the same run without a group (the reference) and under gloo.

    python -m benchmarks._gpu_dist OUT.json [--dry-run]     # --dry-run: CPU, gloo only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks._gpu_common import max_rel_diff, same_bits
from benchmarks._gpu_llama import LLAMA_TINY, build_llama
from hf_grass.attribution import run_attribution_pass
from hf_grass.config import GraSSConfig
from hf_grass.distributed import Distributed, backend_device, current_distributed
from hf_grass.query import Attributor

# wide enough that the default global layout projects (the factor spaces do not fit the row)
LLAMA_DIST = {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 1024,
              "rope_theta": 500000.0}  # fmt: skip
# float32 model and query; int8 rows: a world of one sums nothing, so the rows should be identical
SCORE_REL_TOL = 1e-5


@dataclass
class OneRankGroup(Distributed):
    """A world of one whose collectives run anyway (through the initialised default group)."""

    @property
    def active(self) -> bool:
        return True


def examples(vocab: int, n: int, seed: int) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 49, (n,), generator=gen).tolist()
    return [{"input_ids": torch.randint(3, vocab, (t,), generator=gen).tolist()} for t in lengths]


def build_and_query(
    model: torch.nn.Module, train: list[dict], queries: list[dict], dist: Distributed | None
) -> dict[str, Any]:
    """A default cache of ``train`` (``dist``'s collectives), then exact dense scores and top-5 lists."""
    folder = tempfile.mkdtemp(prefix="gpu_suite_dist_")
    try:
        start = time.perf_counter()
        cache = run_attribution_pass(model, train, GraSSConfig(cache_dir=folder, ekfac_sample_size=16),
                                     batch_size=4, dist=dist, disable_progress=True)  # fmt: skip
        build_s = time.perf_counter() - start
        attributor = Attributor(model, None, cache, search="exact")
        dense = attributor.attribute(queries)
        lists = attributor.attribute_top_k(queries, 5)
        return {
            "rows": cache.load(),
            "dense": dense.double().cpu(),
            "top": lists.top.indices.cpu(),  # type: ignore[union-attr]
            "bottom": lists.bottom.indices.cpu(),  # type: ignore[union-attr]
            "build_s": build_s,
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def collective_checks(dist: Distributed) -> dict[str, Any]:
    """Each collective of ``Distributed`` on CPU tensors of the library's dtypes (one rank: identity)."""
    sums = {"f64": torch.arange(6, dtype=torch.float64).reshape(2, 3), "i64": torch.tensor([3, -1])}
    reduced = dist.all_reduce_sum(sums)
    gathered = dist.all_gather(torch.arange(5, dtype=torch.uint8))
    dist.barrier()
    out = {
        "backend_device": str(backend_device()),
        "all_reduce_sum": all(
            same_bits(reduced[k], sums[k]) and reduced[k].device == sums[k].device for k in sums
        ),
        "max_int": dist.max_int(7) == 7,
        "all_gather": len(gathered) == 1 and torch.equal(gathered[0], torch.arange(5, dtype=torch.uint8)),
        "agree_on_error_none": dist.agree_on_error(None) is None,
        "agree_on_error_message": dist.agree_on_error("boom") == "rank 0 of 1: boom",
    }
    out["ok"] = all(v for k, v in out.items() if k != "backend_device")
    return out


def compare(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    out = {
        "rows_same_bits": same_bits(run["rows"], ref["rows"]),
        "rows_max_rel": max_rel_diff(run["rows"], ref["rows"]),
        "scores_max_rel": max_rel_diff(run["dense"], ref["dense"]),
        "top5_equal": bool(torch.equal(run["top"], ref["top"]) and torch.equal(run["bottom"], ref["bottom"])),
        "build_s": run["build_s"],
    }
    out["ok"] = out["scores_max_rel"] <= SCORE_REL_TOL and out["top5_equal"]
    return out


def run_backend(
    backend: str, model: torch.nn.Module, train: list, queries: list, ref: dict[str, Any]
) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix=f"gpu_suite_pg_{backend}_")
    out: dict[str, Any] = {}
    start = time.perf_counter()
    torch.distributed.init_process_group(
        backend, init_method=f"file://{folder}/rendezvous", rank=0, world_size=1
    )
    try:
        out["init_s"] = time.perf_counter() - start
        out["current_distributed"] = repr(current_distributed())
        out["collectives"] = collective_checks(OneRankGroup(0, 1))
        out["forced"] = compare(build_and_query(model, train, queries, OneRankGroup(0, 1)), ref)
        # the library's own choice under an initialised group (world of one: no collectives)
        out["default_dist"] = compare(build_and_query(model, train, queries, None), ref)
        out["ok"] = out["collectives"]["ok"] and out["forced"]["ok"] and out["default_dist"]["ok"]
    finally:
        torch.distributed.destroy_process_group()
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the NCCL / gloo section of benchmarks.gpu_suite")
    parser.add_argument("out", type=Path, help="where the JSON result goes")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, gloo only")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    result: dict[str, Any] = {"device": str(device), "backends": {}}

    def write() -> None:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    try:
        shape = LLAMA_TINY if args.dry_run else LLAMA_DIST
        model = build_llama(shape, 64, device, torch.float32)
        train, queries = examples(shape["vocab"], 24, seed=0), examples(shape["vocab"], 3, seed=1)
        ref = build_and_query(model, train, queries, None)
        result["reference"] = {"rows": list(ref["rows"].shape), "build_s": ref["build_s"]}
        write()
        for backend in (["nccl"] if cuda else []) + ["gloo"]:
            try:
                result["backends"][backend] = run_backend(backend, model, train, queries, ref)
            except Exception as err:  # noqa: BLE001 - recorded; the next backend still runs
                result["backends"][backend] = {"error": repr(err), "traceback": traceback.format_exc(limit=8)}
            write()
    except Exception as err:  # noqa: BLE001 - the parent reads the error from the JSON
        result["error"] = repr(err)
        result["traceback"] = traceback.format_exc(limit=8)
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
