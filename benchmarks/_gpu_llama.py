"""The Llama-3.1-8B-shaped sections of ``benchmarks.gpu_suite``: a plain forward + backward, the
default attribution pass (warm-up timed apart), FactGraSS against LoGra, and peak GPU memory.

The model has random bf16 weights built from ``LlamaConfig`` directly on the device (nothing is
downloaded). Every timed call is synchronised (``torch.cuda.synchronize``) before the clock is read;
each figure is the median of ``repeats`` calls after ``warmup`` untimed ones.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from benchmarks._gpu_common import free_memory, kernels_mode, peak_gib, rate, reset_peak, sync, time_calls
from hf_grass import kernels
from hf_grass.capture import CaptureRequest, GradientComputer, per_example_loss
from hf_grass.config import GraSSConfig

# Llama-3.1-8B's shapes (config.json of meta-llama/Llama-3.1-8B), and the tiny ones of --dry-run
LLAMA_8B = {
    "hidden": 4096,
    "intermediate": 14336,
    "layers": 32,
    "heads": 32,
    "kv_heads": 8,
    "vocab": 128256,
    "rope_theta": 500000.0,
}
LLAMA_TINY = {
    "hidden": 64,
    "intermediate": 160,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "vocab": 512,
    "rope_theta": 500000.0,
}


@dataclass
class LlamaRun:
    """What the Llama sections run: the model's shape, the batches and the repetitions."""

    shape: dict[str, Any]
    seq: int  # tokens per example (every token supervised, no padding)
    batch: int  # examples per forward/backward
    pass_examples: int  # examples of the default pass (its warm-up takes the first ones)
    # depth of the default-pass section (its warm-up grows with it); None: chosen from a probe
    pass_layers: int | None
    ks: tuple[int, ...]  # compressed numbers per module in the compression table
    warmup: int
    repeats: int
    device: str
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# ---- the model --------------------------------------------------------------------------------------


def build_llama(
    shape: dict[str, Any], seq: int, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"
) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` with random weights, created on ``device`` in ``dtype``
    (initialising 8B parameters on the CPU and copying them would take minutes)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        rope_theta=shape["rope_theta"],
        max_position_embeddings=max(2048, 2 * seq),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation=attn)
    return model.to(device=device, dtype=dtype).eval()


def token_batch(vocab: int, n: int, seq: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` random sequences of ``seq`` tokens, every token supervised, no padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=gen)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.clone().to(device),
    }


@contextlib.contextmanager
def truncated(model: nn.Module, layers: int) -> Iterator[nn.Module]:
    """The model with only its first ``layers`` decoder layers (restored on exit)."""
    base = model.model
    full = base.layers
    if layers >= len(full):
        yield model
        return
    depth = model.config.num_hidden_layers
    base.layers = nn.ModuleList(list(full)[:layers])
    model.config.num_hidden_layers = layers
    try:
        yield model
    finally:
        base.layers = full
        model.config.num_hidden_layers = depth


def model_facts(model: nn.Module) -> dict[str, Any]:
    cfg = model.config
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": cfg.num_hidden_layers,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "rope": getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None),
        "dtype": str(next(model.parameters()).dtype),
    }


# ---- a) a plain forward + backward --------------------------------------------------------------------


def plain_forward_backward(model: nn.Module, run: LlamaRun, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A training step without the optimizer: every parameter requires grad, the loss is the sum of
    the per-example summed token losses (the pass's loss)."""
    device = batch["input_ids"].device
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        # no KV cache: a training step builds none (the pass does, until it passes use_cache=False)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits
        per_example_loss(logits, batch["labels"], "sum", batch["attention_mask"]).sum().backward()

    reset_peak(device)
    try:
        seconds = time_calls(step, device, run.warmup, run.repeats)
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
    out = rate(batch["input_ids"].numel(), seconds)
    out["peak_gib"] = peak_gib(device)
    free_memory()
    return out


# ---- c) compression: FactGraSS against LoGra -----------------------------------------------------------


def compression_configs(k: int) -> dict[str, GraSSConfig]:
    """The seed's comparison at ``k`` numbers per module, per-module layout, no preconditioner."""
    return {
        "factgrass": GraSSConfig(
            compressor="factgrass", proj_dim=k, mask_basis="input", preconditioner="identity"
        ),
        "logra": GraSSConfig(compressor="logra", proj_dim=k, preconditioner="identity"),
    }


def computer_rate(
    model: nn.Module,
    config: GraSSConfig,
    run: LlamaRun,
    batch: dict[str, torch.Tensor],
    request: CaptureRequest,
) -> dict[str, Any]:
    """Tokens/s of ``GradientComputer.compute`` (forward + backward + what ``request`` asks for)."""
    device = batch["input_ids"].device
    start = time.perf_counter()
    computer = GradientComputer(model, config)
    setup = time.perf_counter() - start
    reset_peak(device)
    with computer.session():
        seconds = time_calls(lambda: computer.compute(batch, request), device, run.warmup, run.repeats)
    out = rate(batch["input_ids"].numel(), seconds)
    out.update(
        peak_gib=peak_gib(device), setup_s=setup, row_dim=computer.row_dim, modules=len(computer.targets)
    )
    return out


def compression_table(
    model: nn.Module,
    run: LlamaRun,
    batch: dict[str, torch.Tensor],
    results: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """FactGraSS (input masks) and LoGra at each k: tokens/s of forward + backward + compress, their
    ratio, and the compression alone (the time above a capture-only forward + backward)."""
    runs: dict[str, Any] = results.setdefault("runs", {})
    try:  # hooks attached, parameters frozen, nothing computed in the hooks: what compression adds to
        base_cfg = compression_configs(run.ks[0])["factgrass"]
        runs["capture_only"] = computer_rate(model, base_cfg, run, batch, CaptureRequest(rows=False))
        free_memory()
    except Exception as err:  # noqa: BLE001 - recorded; the compressors are still measured
        runs["capture_only"] = {"error": repr(err)}
        free_memory()
    save()
    base = runs["capture_only"].get("median_s")
    for k in run.ks:
        for name, config in compression_configs(k).items():
            key = f"{name}_k{k}"
            try:
                runs[key] = computer_rate(model, config, run, batch, CaptureRequest(rows=True))
                free_memory()  # the computer (its compressors) is gone with computer_rate's frame
                if base is not None and runs[key]["median_s"] > base:
                    runs[key]["compress_only_tokens_per_s"] = runs[key]["tokens"] / (
                        runs[key]["median_s"] - base
                    )
            except Exception as err:  # noqa: BLE001 - e.g. out of memory at one k: the others still run
                runs[key] = {"error": repr(err)}
                free_memory()
            save()
        fact, logra = runs.get(f"factgrass_k{k}", {}), runs.get(f"logra_k{k}", {})
        if "tokens_per_s" in fact and "tokens_per_s" in logra:
            results.setdefault("ratio_factgrass_over_logra", {})[str(k)] = (
                fact["tokens_per_s"] / logra["tokens_per_s"]
            )
        if "compress_only_tokens_per_s" in fact and "compress_only_tokens_per_s" in logra:
            results.setdefault("compress_only_ratio", {})[str(k)] = (
                fact["compress_only_tokens_per_s"] / logra["compress_only_tokens_per_s"]
            )
        save()
    results["kernel_backend"] = kernels.backend_for(batch["input_ids"].float())
    if results["kernel_backend"] == "triton":  # what the Triton kernels gain at this scale
        key = f"factgrass_k{run.ks[0]}_torch_kernels"
        try:
            with kernels_mode("torch"):
                config = compression_configs(run.ks[0])["factgrass"]
                runs[key] = computer_rate(model, config, run, batch, CaptureRequest(rows=True))
        except Exception as err:  # noqa: BLE001 - recorded
            runs[key] = {"error": repr(err)}
        free_memory()
        save()


# ---- b) the default attribution pass, warm-up apart ----------------------------------------------------


@contextlib.contextmanager
def _patched(owner: Any, name: str, make: Callable[[Callable], Callable], found: list[str]) -> Iterator[None]:
    """``owner.name`` replaced by ``make(original)`` for the duration (nothing if it does not exist:
    the library is being refactored, and a missing hook point must not stop the measurement)."""
    original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if original is None:
        yield
        return
    setattr(owner, name, make(original))
    found.append(f"{getattr(owner, '__name__', owner)}.{name}")
    try:
        yield
    finally:
        setattr(owner, name, original)


def _timed(
    timings: dict[str, Any], key: str, device: torch.device, reset: bool = False
) -> Callable[[Callable], Callable]:
    """A wrapper that adds the seconds (and the peak GPU memory so far) of each call to
    ``timings[key]``; with ``reset`` the peak is reset afterwards (the next phase's is its own)."""

    def make(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(device)
                entry = timings.setdefault(key, {"seconds": 0.0, "calls": 0})
                entry["seconds"] += time.perf_counter() - start
                entry["calls"] += 1
                entry["peak_gib"] = peak_gib(device)
                if reset:
                    reset_peak(device)

        return wrapper

    return make


def _stepwise(steps: list[dict[str, Any]], device: torch.device) -> Callable[[Callable], Callable]:
    """A wrapper of ``BatchRunner.encoded`` that records the seconds each step took to produce."""

    def make(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def encoded(self: Any, plan: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            start = time.perf_counter()
            for item in fn(self, plan, *args, **kwargs):
                sync(device)
                examples = len(getattr(item[0], "indices", ()))
                steps.append({"examples": examples, "seconds": time.perf_counter() - start})
                yield item
                start = time.perf_counter()  # the consumer's time (buffering rows) is not the step's

        return encoded

    return make


def default_pass(model: nn.Module, run: LlamaRun, results: dict[str, Any], save: Callable[[], None]) -> None:
    """``run_attribution_pass`` with ``GraSSConfig()`` over ``pass_examples`` random sequences: the
    warm-up (K-FAC eigenbasis fit) timed apart from the main pass's steady state."""
    from hf_grass.attribution import batches as batches_module
    from hf_grass.attribution import run_attribution_pass
    from hf_grass.attribution import runner as runner_module

    device = next(model.parameters()).device
    tokens = token_batch(run.shape["vocab"], run.pass_examples, run.seq, device, seed=1)["input_ids"].cpu()
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in tokens]
    timings: dict[str, Any] = results.setdefault("timings", {})
    steps: list[dict[str, Any]] = results.setdefault("steps", [])
    found: list[str] = results.setdefault("instrumented", [])
    cache_dir = tempfile.mkdtemp(prefix="gpu_suite_pass_")
    config = GraSSConfig(cache_dir=cache_dir)
    results["config"] = {k: v for k, v in config.to_dict().items() if k != "cache_dir"}
    results["pass_layers"] = model.config.num_hidden_layers
    hooks = [
        (runner_module.AttributionPass, "warmup", _timed(timings, "warmup", device, reset=True)),
        (runner_module, "fit_eigen_masks", _timed(timings, "warmup_fit_eigen_masks", device)),
        (runner_module, "fit_masked_basis", _timed(timings, "warmup_fit_masked_basis", device)),
        (batches_module.BatchRunner, "encoded", _stepwise(steps, device)),
    ]
    reset_peak(device)
    start = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            for owner, name, make in hooks:
                stack.enter_context(_patched(owner, name, make, found))
            save()
            cache = run_attribution_pass(model, examples, config, batch_size=run.batch, disable_progress=True)
        results["rows"] = cache.num_rows
        results["row_dim"] = cache.dim
    finally:
        # also after a timeout: how long it ran. The warm-up's peak is timings["warmup"]["peak_gib"]
        # (the peak is reset after it); without a timed warm-up this is the whole run's.
        results["elapsed_s"] = time.perf_counter() - start
        results["peak_gib_main" if "warmup" in timings else "peak_gib"] = peak_gib(device)
        shutil.rmtree(cache_dir, ignore_errors=True)
        summarise_steps(results, run.seq)
        free_memory()


def summarise_steps(results: dict[str, Any], seq: int) -> None:
    """Steady-state tokens/s of the main pass: every step but the first (which builds the maps and
    compiles kernels), or the only one."""
    steps = results.get("steps") or []
    steady = steps[1:] if len(steps) > 1 else steps
    seconds = sum(s["seconds"] for s in steady)
    if seconds > 0:
        results["steady_tokens_per_s"] = sum(s["examples"] for s in steady) * seq / seconds
        results["steady_steps"] = len(steady)
    if "warmup" in results.get("timings", {}):
        results["warmup_s"] = results["timings"]["warmup"]["seconds"]


def run_dict(run: LlamaRun) -> dict[str, Any]:
    return asdict(run)


# the share of the budget left that the chosen depth's pass may be expected to take (the estimate
# is conservative already: the probe's fixed costs, lm_head and compilation, count as per layer)
PASS_SAFETY = 0.7


def pass_at_depth(
    model: nn.Module,
    run: LlamaRun,
    batch: dict[str, torch.Tensor],
    layers: int,
    results: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """The default pass and its plain forward + backward baseline on the first ``layers`` layers."""
    with truncated(model, layers):
        try:
            results["plain"] = plain_forward_backward(model, run, batch)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory with weight gradients: the pass still runs
            results["plain"] = {"error": repr(err)[:1000]}
            free_memory()
        save()
        default_pass(model, run, results, save)


def default_pass_section(
    model: nn.Module,
    run: LlamaRun,
    batch: dict[str, torch.Tensor],
    results: dict[str, Any],
    save: Callable[[], None],
    seconds_left: Callable[[], float],
) -> None:
    """The default pass at ``run.pass_layers``, or (None) at the largest depth the budget allows,
    estimated from a probe at 2 layers: the warm-up's eigendecompositions grow with the depth, and
    a run cut short by the budget would leave no steady-state number at all."""
    layers = run.shape["layers"]
    if run.pass_layers is not None:
        pass_at_depth(model, run, batch, min(run.pass_layers, layers), results.setdefault("final", {}), save)
        return
    probe_layers = max(1, min(2, layers // 2))
    start = time.perf_counter()
    pass_at_depth(model, run, batch, probe_layers, results.setdefault("probe", {}), save)
    per_layer = (time.perf_counter() - start) / probe_layers
    left = seconds_left()
    depth = max(probe_layers, min(layers, int(PASS_SAFETY * left / per_layer)))
    results["depth_choice"] = {
        "probe_layers": probe_layers,
        "seconds_per_layer": per_layer,
        "seconds_left": left,
        "estimated_full_depth_s": per_layer * layers,
        "chosen_layers": depth,
    }
    save()
    if depth > probe_layers:
        pass_at_depth(model, run, batch, depth, results.setdefault("final", {}), save)
