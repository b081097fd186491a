"""Peak host memory (RSS) of the warm-up on a wide CPU Llama, against the memory model of
docs/howto/memory.md (``benchmarks/_memory_model.py``).

The model: a 4-layer Llama with random float32 weights (hidden 2048, MLP 8704 wide, above the
8192 that keeps a full covariance, so the MLP's wide sides and the 32k-word ``lm_head`` are hashed).
It runs in a fresh subprocess (``--child``), which:

1. builds the model and the examples (random tokens, ``--seq`` each, no padding);
2. runs one batch through the capture with no covariances (``CaptureRequest(rows=False)``): the
   model, its activations and the hooks' saved inputs, i.e. everything but the warm-up's own
   memory. Its peak RSS is the **baseline**;
3. runs the default attribution pass (``run_attribution_pass``, EK-FAC, masks in the eigenbasis)
   over ``--examples`` examples, all of them in the warm-up sample, and reads the peak RSS
   (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, and ``VmHWM``) of each phase apart, reset
   through ``/proc/self/clear_refs`` between phases (which resets both): the covariance sums
   accumulating, the fit, the end of the warm-up (the basis written and read back), the main pass.

The warm-up's measured cost is its peak minus the baseline; the model predicts it as the sums plus
the larger of a hook's temporaries and the fit's, plus the eigenbasis (held twice while it is
written and read back). ``--model-only`` prints the model's tables for Llama-3.1-8B and SmolLM2-135M
shapes, and the warm-up of OLMoE-1B-7B, Mixtral-8x7B and Qwen3-30B-A3B shapes before and after the
experts' pooled sums and byte budget (no run).

    python -m benchmarks.warmup_memory --json-out warmup_memory.json
    python -m benchmarks.warmup_memory --model-only
    python -m benchmarks.warmup_memory --smoke          # a tiny model with wide sides: checks it runs
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, cpu_name, emit_report, parse_with_smoke
from benchmarks._memory_model import (
    LLAMA_8B,
    MIXTRAL_8X7B,
    OLMOE_1B_7B,
    QWEN3_30B_A3B,
    SMOLLM2,
    WIDE_CPU,
    LlamaShape,
    apply_budget,
    fmt,
    hook_inputs_per_token,
    llama_linears,
    main_pass_bytes,
    moe_linears,
    warmup_bytes,
)

TINY_WIDE = LlamaShape("tiny Llama with wide sides (smoke)", 64, 8256, 2, 4, 2, 8448)
SHAPES = {"wide": WIDE_CPU, "tiny": TINY_WIDE, "llama8b": LLAMA_8B}
SMOKE = {"shape": "tiny", "examples": 8, "seq": 16, "batch_size": 4}


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def reset_hwm() -> bool:
    """Reset this process's peak RSS (``VmHWM``, and ``ru_maxrss`` with it) to the current RSS
    (Linux >= 4.0); False where that is not allowed (the phases' peaks are then cumulative)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def maxrss() -> int:
    """Peak RSS of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class DeviceMemory:
    """Peak allocated memory of a CUDA device (zeros on the CPU)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        if not self.cuda:
            return 0
        self.torch.cuda.synchronize()
        return int(self.torch.cuda.max_memory_allocated())

    def now(self) -> int:
        return int(self.torch.cuda.memory_allocated()) if self.cuda else 0


def build_model(shape: LlamaShape, device: str, dtype: str):  # noqa: ANN201 - transformers type
    """Random weights created on ``device`` in ``dtype`` (8B parameters initialised on a CPU and
    copied would take minutes)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype), attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(device).eval()


def child(shape_name: str, examples: int, seq: int, batch_size: int, device: str, dtype: str) -> dict[str, Any]:
    """Steps 1-3 of the module docstring, in this (fresh) process."""
    import torch

    import hf_grass.attribution.runner as runner_module
    from hf_grass.attribution import run_attribution_pass
    from hf_grass.capture import CaptureRequest, GradientComputer
    from hf_grass.config import GraSSConfig
    from hf_grass.testing import random_token_examples

    torch.set_num_threads(1)
    shape = SHAPES[shape_name]
    gpu = DeviceMemory(device)
    model = build_model(shape, device, dtype)
    data = random_token_examples(examples, shape.vocab, lo=seq, hi=seq + 1)
    # every example in the warm-up sample; the main pass then covers the same examples
    config = GraSSConfig(ekfac_sample_size=examples, warmup_tokens=examples * seq, batch_size=batch_size)
    out: dict[str, Any] = {"rss_model": status_kb("VmRSS") * 1024, "device_model": gpu.now(), "hwm_reset": reset_hwm()}

    computer = GradientComputer(model, config)
    ids = torch.tensor([ex["input_ids"] for ex in data[:batch_size]])
    gpu.reset()
    with computer.session():
        computer.compute({"input_ids": ids, "labels": ids}, CaptureRequest(rows=False))
    del computer
    out["baseline_peak"] = maxrss()
    out["device_baseline_peak"] = gpu.peak()
    print(f"baseline: {out}", file=sys.stderr, flush=True)

    phases: dict[str, dict[str, float]] = {}
    real_fit, real_warmup = runner_module.fit_eigen_masks, runner_module.AttributionPass.warmup

    def fit(*args: Any, **kwargs: Any) -> Any:
        sums = args[1]
        phases["accumulate"] = {"hwm": status_kb("VmHWM") * 1024, "maxrss": maxrss(), "sums": sums.nbytes(),
                                "device_peak": gpu.peak(), "seconds": time.perf_counter() - begin[0]}  # fmt: skip
        out["input_keys"] = len(sums.inputs)
        print(f"accumulated: {phases['accumulate']}", file=sys.stderr, flush=True)
        reset_hwm()
        gpu.reset()
        start = time.perf_counter()
        basis = real_fit(*args, **kwargs)
        phases["fit"] = {"hwm": status_kb("VmHWM") * 1024, "device_peak": gpu.peak(),
                         "seconds": time.perf_counter() - start}  # fmt: skip
        print(f"fitted: {phases['fit']}", file=sys.stderr, flush=True)
        return basis

    def warmup(self: Any, writer: Any) -> Any:
        reset_hwm()
        gpu.reset()
        begin[0] = start = time.perf_counter()
        basis = real_warmup(self, writer)
        phases["warmup"] = {"maxrss": maxrss(), "seconds": time.perf_counter() - start,
                            "rss_after": status_kb("VmRSS") * 1024, "device_after": gpu.now()}  # fmt: skip
        reset_hwm()
        gpu.reset()
        return basis

    begin = [0.0]

    runner_module.fit_eigen_masks, runner_module.AttributionPass.warmup = fit, warmup  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache = run_attribution_pass(model, data, config, cache_dir=Path(tmp) / "cache", disable_progress=True)
        phases["main"] = {"hwm": status_kb("VmHWM") * 1024, "device_peak": gpu.peak(),
                          "seconds": time.perf_counter() - start}  # fmt: skip
        out["eigenbasis_file"] = (cache.path / cache.manifest["eigenbasis"]["file"]).stat().st_size
        out["row_dim"] = cache.dim
    out["phases"] = phases
    out["final_maxrss"] = maxrss()
    return out


def predict(shape: LlamaShape, batch: int, seq: int, act_bytes: int, gpu: bool) -> dict[str, Any]:
    """The model's terms for ``shape`` and its predictions of the warm-up's peaks over the baseline:
    the sums plus the larger of a hook's temporaries and the fit's, on the model's device; the
    eigenbasis (held twice at the end of the warm-up: written, and read back) in host memory."""
    linears = llama_linears(shape)
    warm = warmup_bytes(linears, batch * seq, act_bytes)
    if gpu:
        warm["predicted_device_increase"] = warm["sums"] + max(warm["hook_transient"], warm["fit_transient"])
        warm["predicted_host_increase"] = 2 * warm["basis"]
    else:
        warm["predicted_host_increase"] = warm["sums"] + max(
            warm["hook_transient"], warm["fit_transient"] + 2 * warm["basis"]
        )
    return {"warmup": warm, "main": main_pass_bytes(linears, batch, seq)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.warmup_memory", "--child", args.shape, str(args.examples),
           str(args.seq), str(args.batch_size), args.device, args.dtype]  # fmt: skip
    # the child's stderr passes through: its phases show as they end (a long GPU run that times out
    # still says how far it got)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring subprocess failed (exit {proc.returncode}; its errors are above)")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    shape, gpu = SHAPES[args.shape], args.device.startswith("cuda")
    act_bytes = 2 if args.dtype in ("bfloat16", "float16") else 4
    model = predict(shape, args.batch_size, args.seq, act_bytes, gpu)
    warm, phases = model["warmup"], got["phases"]
    # the peak RSS is reset at each phase (clear_refs resets ru_maxrss too): the warm-up's is the largest
    peak = max(phases["accumulate"]["hwm"], phases["fit"]["hwm"], phases["warmup"]["maxrss"])
    host = peak - got["baseline_peak"]
    main = model["main"]
    main_predicted = sum(main[k] for k in ("ekfac", "factor_grads", "curvature_grads", "hashed_transient"))
    main_predicted += 0 if gpu else main["checkpoint"]  # on the CPU the moments and their copy share the host
    result: dict[str, Any] = {
        "shape": shape.__dict__,
        "params": shape.params,
        "measured": got,
        "model": model,
        "sums_measured_over_predicted": phases["accumulate"]["sums"] / warm["sums"],
        "host_increase_measured": host,
        "host_increase_predicted": warm["predicted_host_increase"],
        "host_measured_over_predicted": host / warm["predicted_host_increase"],
        # the main pass, on the CPU: its statistics, the batch's factor and curvature gradients, the
        # largest temporary of a hashed module, over the baseline's activations
        "main_increase_measured": phases["main"]["hwm"] - got["baseline_peak"],
        "main_increase_predicted": main_predicted,
    }
    print(f"{shape.name}: {shape.params / 1e9:.2f} B parameters on {args.device} ({args.dtype}), "
          f"batch {args.batch_size} x {args.seq}; baseline peak RSS {fmt(got['baseline_peak'])}")  # fmt: skip
    print(f"  covariance sums: {fmt(phases['accumulate']['sums'])} allocated, model {fmt(warm['sums'])}")
    print(f"  warm-up peak RSS over the baseline: measured {fmt(host)}, predicted "
          f"{fmt(warm['predicted_host_increase'])} ({result['host_measured_over_predicted']:.2f}x)")  # fmt: skip
    if gpu:
        device = max(phases["accumulate"]["device_peak"] - got["device_baseline_peak"],
                     phases["fit"]["device_peak"] - got["device_model"])  # fmt: skip
        result.update(device_increase_measured=device, device_increase_predicted=warm["predicted_device_increase"],
                      device_measured_over_predicted=device / warm["predicted_device_increase"])  # fmt: skip
        print(f"  warm-up peak GPU memory over the baseline: measured {fmt(device)}, predicted "
              f"{fmt(warm['predicted_device_increase'])}; peaks: baseline {fmt(got['device_baseline_peak'])}, "
              f"accumulate {fmt(phases['accumulate']['device_peak'])}, fit {fmt(phases['fit']['device_peak'])}, "
              f"main pass {fmt(phases['main']['device_peak'])}")  # fmt: skip
    print(f"  main pass peak RSS over the baseline: measured {fmt(result['main_increase_measured'])}, "
          f"counted {fmt(main_predicted)} (statistics, a batch's gradients, a hashed module's temporaries)")
    print(f"  phases: accumulate {phases['accumulate']['seconds']:.0f} s, peak RSS {fmt(phases['accumulate']['hwm'])}; "
          f"fit {phases['fit']['seconds']:.0f} s, peak RSS {fmt(phases['fit']['hwm'])}; main pass peak RSS "
          f"{fmt(phases['main']['hwm'])}; eigenbasis file {fmt(got['eigenbasis_file'])} "
          f"(model {fmt(warm['basis'])})")  # fmt: skip
    return result


def model_tables(batch: int, seq: int) -> dict[str, Any]:
    """The memory model's numbers for Llama-3.1-8B and SmolLM2-135M shapes (bf16 weights), and the
    warm-up of MoE shapes before and after the experts' pooled sums and byte budget."""
    out = {}
    for shape in (LLAMA_8B, SMOLLM2):
        linears = llama_linears(shape)
        warm = warmup_bytes(linears, batch * seq, act_bytes=2)
        main = main_pass_bytes(linears, batch, seq)
        out[shape.name] = {
            "params": shape.params,
            "weights_bf16": 2 * shape.params,
            "warmup": warm,
            "main": main,
            "hook_inputs_per_token_bf16": hook_inputs_per_token(linears, 2),
            "batch": batch,
            "seq": seq,
        }
        print(f"{shape.name} ({shape.params / 1e9:.2f} B parameters, bf16 weights {fmt(2 * shape.params)}), "
              f"batch {batch} x {seq} tokens:")  # fmt: skip
        for part, terms in (("warm-up", warm), ("main pass", main)):
            print(f"  {part}: " + ", ".join(f"{k} {fmt(v)}" for k, v in terms.items()))
        print(f"  hook-saved inputs: {fmt(hook_inputs_per_token(linears, 2))} per token")
    for moe in (OLMOE_1B_7B, MIXTRAL_8X7B, QWEN3_30B_A3B):
        # before: every expert its own sums (the library until the experts' pools); pooled: one sum
        # per layer of the experts' up inputs and down outputs; after: pooled, and the byte budget
        steps = {"before": moe_linears(moe, pooled=False), "pooled": moe_linears(moe)}
        steps["after"] = apply_budget(steps["pooled"])
        warm = {k: warmup_bytes(v, batch * seq, act_bytes=2) for k, v in steps.items()}
        hashed = sorted({f"{lin.family} {'inputs' if lin.hashed_in else 'outputs'}" for lin in steps["after"]
                         if lin.hashed_in or lin.hashed_out})  # fmt: skip
        out[moe.name] = {"params": moe.params, "weights_bf16": 2 * moe.params, "warmup": warm,
                         "budget_hashed": hashed, "batch": batch, "seq": seq}  # fmt: skip
        print(f"{moe.name} ({moe.params / 1e9:.2f} B parameters, {moe.experts} experts of {moe.expert_intermediate}, "
              f"top {moe.top_k}), warm-up sums: before {fmt(warm['before']['sums'])}, experts pooled "
              f"{fmt(warm['pooled']['sums'])}, with the budget {fmt(warm['after']['sums'])} "
              f"(hashed for the budget: {', '.join(hashed) or 'nothing'})")  # fmt: skip
        print("  after: " + ", ".join(f"{k} {fmt(v)}" for k, v in warm["after"].items()))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="wide")
    parser.add_argument("--examples", type=int, default=32, help="examples (all in the warm-up sample)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per example")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the GPU check: peak GPU memory too)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the weights' dtype")
    parser.add_argument("--model-only", action="store_true", help="print the model's tables, run nothing")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--child", nargs=6, default=None, help=argparse.SUPPRESS)
    args = parse_with_smoke(parser, argv, SMOKE)
    if args.child:
        name, examples, seq, batch, device, dtype = args.child
        print(json.dumps(child(name, int(examples), int(seq), int(batch), device, dtype)))
        return
    report: dict[str, Any] = {
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "cpu": cpu_name(), "threads": 1},
        "tables": model_tables(batch=2, seq=1024),  # the batch of the H200 run (docs/howto/memory.md)
    }
    if not args.model_only:
        report["run"] = measure(args)
    emit_report(report, args.json_out)


if __name__ == "__main__":
    main()
