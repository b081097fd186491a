"""Where the default pass's time goes on a GPU, stage by stage, for a Llama-8B-shaped model of a few
layers (a diagnosis for benchmarks.gpu_suite's "default pass" row; not a benchmark of its own).

    PYTHONPATH=. python -m benchmarks._gpu_profile --layers 8 [--dry-run]

Stages of one step of ``BatchRunner.encoded`` are timed apart (synchronised): the forward + backward
with the capture hooks, the rotation, the whitened rows, the statistics, the storage encoding and the
norms; then ``torch.profiler`` lists the top operators of two steps by device and by host time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict

import torch

from benchmarks._gpu_common import sync
from benchmarks._gpu_llama import LLAMA_8B, LLAMA_TINY, build_llama, token_batch
from hf_grass.attribution import Batching, run_attribution_pass
from hf_grass.attribution.plan import module_specs
from hf_grass.attribution.runner import AttributionPass
from hf_grass.capture import GradientComputer
from hf_grass.config import GraSSConfig
from hf_grass.data import ExampleSource
from hf_grass.precondition import Eigenbasis, StatsAccumulator, preconditioner_class


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    shape = dict(LLAMA_TINY if args.dry_run else LLAMA_8B)
    shape["layers"] = args.layers if not args.dry_run else 2
    seq = 32 if args.dry_run else args.seq
    dtype = torch.bfloat16
    model = build_llama(shape, seq, device, dtype)
    n = args.batch * (args.steps + 2)
    ids = token_batch(shape["vocab"], n, seq, device)["input_ids"].cpu()
    examples = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    config = GraSSConfig(cache_dir=tempfile.mkdtemp())
    start = time.perf_counter()
    cache = run_attribution_pass(model, examples[: 2 * args.batch], config, batch_size=args.batch, disable_progress=True)
    print(f"reference pass (warm-up + {2 * args.batch} examples): {time.perf_counter() - start:.1f} s")
    computer = GradientComputer(model, config)
    flat = cache.eigenbasis()
    assert flat is not None
    basis = Eigenbasis.from_tensors(flat)
    basis.attach(computer.compressors)
    needs = preconditioner_class(computer.config.preconditioner).statistics(computer.config.mask_basis == "eigen")
    stats = StatsAccumulator(module_specs(computer), needs, basis, device=computer.device)
    runner = AttributionPass(computer, ExampleSource(examples), tempfile.mkdtemp(), Batching(args.batch, disable_progress=True))
    request = runner.row_request(basis, stats)
    print("request:", request)
    stages: dict[str, list[float]] = defaultdict(list)

    def one_step(i: int) -> None:
        idx = list(range(i * args.batch, (i + 1) * args.batch))
        sync(device)
        t = time.perf_counter()
        batch = runner.compute(idx, request)
        sync(device)
        stages["forward+backward+hooks"].append(time.perf_counter() - t)
        grads = batch.grads
        assert grads is not None
        t = time.perf_counter()
        rotated = {name: basis.rotate(name, g) for name, g in grads.factor_grads.items()}
        sync(device)
        stages["rotate"].append(time.perf_counter() - t)
        t = time.perf_counter()
        grads.rows = runner.whitened_rows(basis, rotated)
        sync(device)
        stages["whitened rows (SJLT)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        stats.update(grads, rotated)
        sync(device)
        stages["statistics"].append(time.perf_counter() - t)
        t = time.perf_counter()
        runner.stored_rows(grads.rows, batch.indices)
        sync(device)
        stages["storage encoding"].append(time.perf_counter() - t)
        t = time.perf_counter()
        runner.row_norms(grads, rotated, basis)
        sync(device)
        stages["norms"].append(time.perf_counter() - t)

    with computer.session():
        one_step(0)  # compile / allocate
        for i in range(1, args.steps):
            one_step(i)
        tokens = args.batch * seq
        print(f"\nper step of {args.batch} x {seq} tokens (median of {args.steps - 1}):")
        total = 0.0
        for name, values in stages.items():
            med = sorted(values[1:])[len(values[1:]) // 2]
            total += med
            print(f"  {name:28s} {med * 1e3:9.1f} ms")
        print(f"  {'total':28s} {total * 1e3:9.1f} ms -> {tokens / total:,.0f} tokens/s")
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            one_step(args.steps)
            one_step(args.steps + 1)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
