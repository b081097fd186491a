"""Tokens/s of the FactGraSS attribution pass against a training step's backward, on the CPU.

One batch of random token ids (B x T, every token supervised) goes through a GPT-2-shaped
``GPT2LMHeadModel`` with random weights and dropout 0, in eval mode, with the same model inputs
(``GradientComputer.model_inputs``: ids, attention mask, position ids) and the same per-example
loss (``hf_grass.capture.per_example_loss``, "sum" reduction, summed over the batch for the
backward) in every variant:

- ``full backward``: every parameter requires grad; forward + backward computes all weight
  gradients (a training step without the optimizer; grads set to None before each call).
- ``activation backward``: every parameter frozen, the input embedding's output made to require
  grad (forward hook), so the backward runs through all layers computing activation gradients
  only: what the attribution pass does, minus the capture hooks.
- ``factgrass k=K identity``: ``GradientComputer.compute`` inside ``session()`` with
  ``CaptureRequest(rows=True)`` (what ``build_cache`` runs with ``preconditioner="identity"``),
  rows cast to the cache dtype (fp16) on the CPU as ``build_cache`` does.
- ``factgrass k=K ekfac``: the library default. What ``build_cache`` does per batch of its main
  pass: ``compute`` with rows + factor-space gradients + factor covariances, then
  ``StatsAccumulator.update`` (float64 covariance sums and the EK-FAC eigenvalue corrections in an
  eigenbasis fitted from one warm-up batch), rows cast to fp16.
- ``ekfac warm-up k=K``: the extra covariance-only pass (``CaptureRequest(rows=False,
  covariances=True)``) that ``build_cache`` runs over the first ``ekfac_sample_size`` (1024)
  examples to fit the eigenbasis; its cost is amortised over the whole dataset.
- ``..., proposed`` (at the ekfac k's; ``--no-proposed`` skips them): the identity and ekfac passes
  with a library change monkeypatched onto their capture (``install_early_mask``, see there).

Targets are the library default: every Linear / Conv1D, ``lm_head`` included (49 modules on GPT-2).
Variants are timed round robin (the starting variant rotates every repetition) after warm-up
calls, so machine drift hits all alike; we report medians, tokens/s = B*T / median and the ratios
to the two baselines. One extra, untimed-for-the-table call of each factgrass variant wraps the
capture hook (and ``StatsAccumulator.update``) with a timer to show how much of the pass they take.

    python -m benchmarks.attribution_pass                    # GPT-2 small, B=4, T=256, k in {256,1024,4096}
    python -m benchmarks.attribution_pass --quick            # 2 layers x 256 wide, B=2, T=128 (< 1 min)
    python -m benchmarks.attribution_pass --threads 1 2 --json-out pass.json
    python -m benchmarks.attribution_pass --profile          # + torch.profiler top ops of two variants
    python -m benchmarks.attribution_pass --threads 1 2 --proj-dims 1024 --no-proposed

Goals (from the issue), for the library default factgrass pass (k=1024): >= 0.9x the activation
backward and >= 1.2x the full backward.

Measured on this machine (2 shared vCPUs, Intel Xeon, torch 2.13 CPU, sdpa attention), GPT-2 small
(124M parameters), B=4, T=256, medians of 5, in a quiet spell (wall clock and process CPU time
agreed within 2%); tok/s by wall clock, ratios by CPU time:

    variant                               1 thread: tok/s  x full  x act   2 threads: tok/s  x full  x act
    full backward                         123              1.00    0.72    229               1.00    0.72
    activation backward                   170              1.39    1.00    318               1.39    1.00
    factgrass k=256 identity              167              1.34    0.96    -
    factgrass k=1024 identity             170              1.36    0.98    306               1.34    0.97
    factgrass k=4096 identity             171              1.36    0.98    -
    factgrass k=1024 ekfac (default)      168              1.35    0.97    292               1.29    0.93
    ekfac warm-up k=1024                  170              1.37    0.98    290               1.28    0.92
    factgrass k=1024 identity, proposed   171              1.38    0.99    295               1.29    0.93
    factgrass k=1024 ekfac, proposed      172              1.39    1.00    303               1.33    0.95

At 1 thread both goals are met at every k, with and without the EK-FAC statistics, in every run
(also under heavy load from other jobs, by CPU time). At 2 threads the ekfac pass is marginal:
0.93x here, 0.88x in an earlier run while other jobs loaded the machine. The capture hooks take
0.06-0.11 s of the ~6 s pass and ``StatsAccumulator.update`` 0.01 s; the rest is the model's own
forward/backward (torch.profiler: mm/addmm ~65% of CPU time, flash attention, log-softmax over the
50257-word vocabulary). "proposed" is ``install_early_mask``: the same pass with the forward hook
keeping only the masked input factor instead of the whole module input; its speed effect is within
the noise (+0-3%), but it lowers the peak RSS of one B=4, T=256 pass by ~190 MB (+1.97 GB -> +1.78
GB; the activation backward alone: +1.83 GB). Quick configuration (2 x 256, B=2, T=128, 1 thread):
factgrass k=1024 0.99x activation / 1.38x full, ekfac 0.93x / 1.30x, proposed ekfac 1.00x / 1.39x.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks._common import cpu_name, emit_report
from hf_grass.cache.build import module_specs
from hf_grass.cache.stats import StatsAccumulator, fit_eigenbasis
from hf_grass.capture import CaptureRequest, GradientComputer, per_example_loss
from hf_grass.capture.hooks import GradientCapture, _accumulate, as_3d
from hf_grass.config import GraSSConfig
from hf_grass.kernels.reference import accumulation_dtype, gather_columns, take_columns

DEFAULT_PROJ_DIM = GraSSConfig().proj_dim  # 1024
# The goals for the default factgrass pass
GOAL_VS_ACTIVATION, GOAL_VS_FULL = 0.9, 1.2
FULL, ACTIVATION = "full backward", "activation backward"


@dataclass
class Result:
    """One variant at one thread count."""

    name: str
    kind: str  # full | activation | factgrass | ekfac | ekfac-warmup | proposed
    threads: int
    proj_dim: int | None = None
    preconditioner: str | None = None
    times_s: list[float] = field(default_factory=list)  # wall clock
    median_s: float | None = None
    tokens_per_s: float | None = None
    x_full: float | None = None
    x_activation: float | None = None
    cpu_times_s: list[float] = field(default_factory=list)  # process CPU time (all threads)
    cpu_median_s: float | None = None
    cpu_tokens_per_s: float | None = None
    cpu_x_full: float | None = None
    cpu_x_activation: float | None = None
    hook_s: float | None = None  # seconds inside the capture hooks (instrumented call)
    stats_s: float | None = None  # seconds in StatsAccumulator.update (instrumented call)
    instrumented_s: float | None = None  # wall time of the instrumented call


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default 12, quick 2)")
    parser.add_argument("--width", type=int, default=None, help="hidden size (default 768, quick 256)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default width // 64)")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary size (default 50257)")
    parser.add_argument("--batch", type=int, default=None, help="examples per batch (default 4, quick 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per example (default 256, quick 128)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first (default 1)")
    parser.add_argument(
        "--proj-dims",
        type=int,
        nargs="+",
        default=None,
        help="factgrass proj_dim values, preconditioner identity (default 256 1024 4096, quick 256 1024)",
    )
    parser.add_argument(
        "--ekfac-proj-dims",
        type=int,
        nargs="*",
        default=None,
        help=f"proj_dim values also run with the ekfac default and its warm-up pass (default {DEFAULT_PROJ_DIM}; "
        "give none to skip)",
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1], help="torch thread counts, each a full run (default 1)"
    )
    parser.add_argument(
        "--no-proposed",
        dest="proposed",
        action="store_false",
        help="skip the variants with the proposed capture change (install_early_mask) at the ekfac k",
    )
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler top ops")
    parser.add_argument(
        "--quick", action="store_true", help="small model (2 x 256), B=2, T=128, k in {256, 1024}"
    )
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    # --quick only changes the defaults; explicit flags still win
    args.layers = args.layers or (2 if args.quick else 12)
    args.width = args.width or (256 if args.quick else 768)
    args.heads = args.heads or max(1, args.width // 64)
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq = args.seq or (128 if args.quick else 256)
    args.repeats = args.repeats or 5
    args.proj_dims = args.proj_dims or ([256, 1024] if args.quick else [256, 1024, 4096])
    if args.ekfac_proj_dims is None:
        args.ekfac_proj_dims = [DEFAULT_PROJ_DIM]
    for name in ("layers", "width", "heads", "vocab", "batch", "seq", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    if args.width % args.heads:
        parser.error(f"--width {args.width} must be divisible by --heads {args.heads}")
    if args.seq < 2:
        parser.error("--seq must be >= 2 (the causal loss needs a next token)")
    if args.warmup < 0 or any(t <= 0 for t in args.threads):
        parser.error("--warmup must be >= 0 and --threads positive")
    return args


def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel  # the benchmark's only transformers use

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=args.heads,
        vocab_size=args.vocab,
        n_positions=max(1024, args.seq),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


class Step:
    """One variant: ``prepare`` (untimed), ``run`` (timed, returns the per-example losses), ``finish``."""

    def prepare(self) -> None:
        pass

    def run(self) -> torch.Tensor:
        raise NotImplementedError

    def finish(self) -> None:
        pass


def set_requires_grad(model: nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


class FullBackward(Step):
    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        self.model, self.inputs, self.labels = model, inputs, labels

    def prepare(self) -> None:
        set_requires_grad(self.model, True)
        self.model.zero_grad(set_to_none=True)

    def run(self) -> torch.Tensor:
        logits = self.model(**self.inputs).logits
        losses = per_example_loss(logits, self.labels, "sum", self.inputs.get("attention_mask"))
        losses.sum().backward()
        return losses.detach()

    def finish(self) -> None:
        self.model.zero_grad(set_to_none=True)
        set_requires_grad(self.model, False)


class ActivationBackward(FullBackward):
    """Frozen parameters; the embedding output is made a leaf that requires grad."""

    handle: torch.utils.hooks.RemovableHandle | None = None

    def prepare(self) -> None:
        set_requires_grad(self.model, False)
        embedding = self.model.get_input_embeddings()
        hook = lambda module, inputs, output: output.detach().requires_grad_(True)
        self.handle = embedding.register_forward_hook(hook)

    def finish(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class FactGraSSPass(Step):
    """``GradientComputer.compute`` in a session, plus what ``build_cache`` does with the result."""

    def __init__(
        self,
        computer: GradientComputer,
        batch: dict[str, torch.Tensor],
        request: CaptureRequest,
        stats: StatsAccumulator | None = None,
    ):
        self.computer, self.batch, self.request, self.stats = computer, batch, request, stats
        self.stack = contextlib.ExitStack()
        self.stats_s = 0.0

    def prepare(self) -> None:
        self.stack.enter_context(self.computer.session())

    def run(self) -> torch.Tensor:
        grads = self.computer.compute(self.batch, self.request)
        if self.stats is not None:
            start = time.perf_counter()
            self.stats.update(grads.rows, grads.factor_grads, grads.cov_in, grads.cov_out, grads.tokens)
            self.stats_s += time.perf_counter() - start
        if grads.rows is not None:
            grads.rows.to(self.computer.config.torch_dtype).cpu()
        return grads.losses

    def finish(self) -> None:
        self.stack.close()


@contextlib.contextmanager
def timed_hooks(capture: GradientCapture) -> Iterator[list[float]]:
    """Accumulate the seconds spent in the capture's backward hook (instance-level monkeypatch)."""
    spent = [0.0]
    original = capture._backward_hook

    @functools.wraps(original)
    def wrapper(*args: Any) -> None:
        start = time.perf_counter()
        try:
            original(*args)
        finally:
            spent[0] += time.perf_counter() - start

    patched = "_backward_hook" in vars(capture)  # e.g. by install_early_mask
    capture._backward_hook = wrapper  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        if patched:
            capture._backward_hook = original  # type: ignore[method-assign]
        else:
            del capture._backward_hook  # back to the class method


def install_early_mask(capture: GradientCapture) -> None:
    """The library change this benchmark proposes, monkeypatched onto one ``GradientCapture``.

    Today the forward hook keeps each target module's whole input ``x`` ([B, T, d_in]) alive until
    the backward hook, although FactGraSS only ever reads its ``m_in`` masked columns (64 of 768 or
    3072 on GPT-2 at k=1024); with frozen weights autograd itself would not keep those inputs. Here
    the forward hook gathers and scales the input factor right away (``FactGraSSCompressor.factors``'
    input half) and keeps only that; the backward hook takes the output factor from ``delta`` and
    does exactly what ``GradientCapture._backward_hook`` does with the factors (covariances,
    factor-space gradient, ``project_factor``), so rows, factor gradients and covariances are the
    same up to float rounding (checked in ``make_steps``).
    """

    def forward_hook(target: Any, module: nn.Module, inputs: tuple, output: torch.Tensor) -> Any:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        replaced = None
        if not output.requires_grad:
            output = replaced = output.detach().requires_grad_(True)
        comp = capture.compressors[target.name]
        x = as_3d(inputs[0].detach())
        xs = gather_columns(x, comp.in_idx, comp.mask_bias_index).to(accumulation_dtype(x)) * comp.scale_in
        output.register_hook(functools.partial(capture._backward_hook, target, xs))
        return replaced

    def backward_hook(target: Any, xs: torch.Tensor, delta: torch.Tensor) -> None:
        comp = capture.compressors[target.name]
        request, state = capture.request, capture.state
        ds = take_columns(as_3d(delta), comp.out_idx).to(xs.dtype) * comp.scale_out
        if request.covariances:
            capture._add_covariances(target.name, xs, ds)
        factor_grad = torch.bmm(ds.transpose(1, 2), xs)
        if request.factor_grads:
            _accumulate(state.factor_grads, target.name, factor_grad)
        if request.rows:
            _accumulate(state.rows, target.name, comp.project_factor(factor_grad))

    capture._forward_hook = forward_hook  # type: ignore[method-assign]
    capture._backward_hook = backward_hook  # type: ignore[method-assign]


def time_round_robin(
    steps: dict[str, Step], warmup: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per ``run`` of each step; repeats interleaved, the first variant
    rotating each time."""
    names = list(steps)
    reference: torch.Tensor | None = None
    for name in names:
        step = steps[name]
        for _ in range(warmup):
            step.prepare()
            try:
                losses = step.run()
            finally:
                step.finish()
            # every variant must compute the same per-example losses (same model, inputs, loss)
            if reference is None:
                reference = losses
            elif not torch.allclose(losses, reference, rtol=1e-4, atol=1e-3):
                raise RuntimeError(f"{name}: losses {losses.tolist()} differ from {reference.tolist()}")
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            step = steps[name]
            step.prepare()
            try:
                start, start_cpu = time.perf_counter(), time.process_time()
                step.run()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            finally:
                step.finish()
        print(
            f"    repeat {rep + 1}/{repeats}: "
            + ", ".join(f"{n} {times[n][-1]:.2f}s (cpu {cpu[n][-1]:.2f}s)" for n in names),
            flush=True,
        )
    return times, cpu


def make_steps(
    model: nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace
) -> tuple[dict[str, Step], dict[str, Result], dict[str, FactGraSSPass]]:
    steps: dict[str, Step] = {}
    results: dict[str, Result] = {}
    passes: dict[str, FactGraSSPass] = {}
    threads = torch.get_num_threads()
    base = GradientComputer(model, GraSSConfig(preconditioner="identity"))
    inputs = base.model_inputs(batch)  # the same inputs compute() gives the model
    labels = batch["labels"]
    steps[FULL] = FullBackward(model, inputs, labels)
    results[FULL] = Result(FULL, "full", threads)
    steps[ACTIVATION] = ActivationBackward(model, inputs, labels)
    results[ACTIVATION] = Result(ACTIVATION, "activation", threads)
    for k in args.proj_dims:
        computer = GradientComputer(model, GraSSConfig(proj_dim=k, preconditioner="identity"))
        name = f"factgrass k={k} identity"
        passes[name] = FactGraSSPass(computer, batch, CaptureRequest(rows=True))
        results[name] = Result(name, "factgrass", threads, k, "identity")
    for k in args.ekfac_proj_dims:
        config = GraSSConfig(proj_dim=k)  # preconditioner defaults to ekfac for factgrass
        computer = GradientComputer(model, config)
        specs = module_specs(computer)
        warm = CaptureRequest(rows=False, covariances=True)  # _warmup's request
        with computer.session():
            grads = computer.compute(batch, warm)
        basis = fit_eigenbasis(specs, grads.cov_in, grads.cov_out)
        stats = StatsAccumulator(specs, "ekfac", basis, device=computer.device)
        request = CaptureRequest(rows=True, **stats.request_kwargs)  # build_cache's main request
        name = f"factgrass k={k} ekfac"
        passes[name] = FactGraSSPass(computer, batch, request, stats)
        results[name] = Result(name, "ekfac", threads, k, "ekfac")
        name = f"ekfac warm-up k={k}"
        passes[name] = FactGraSSPass(computer, batch, warm)
        results[name] = Result(name, "ekfac-warmup", threads, k, "ekfac")
        if args.proposed:
            for pre, req, acc in (("identity", CaptureRequest(rows=True), None), ("ekfac", request, stats)):
                patched = GradientComputer(model, config)
                install_early_mask(patched.capture)
                check_same_capture(computer, patched, batch, req)
                if acc is not None:
                    acc = StatsAccumulator(specs, "ekfac", basis, device=patched.device)
                name = f"factgrass k={k} {pre}, proposed"
                passes[name] = FactGraSSPass(patched, batch, req, acc)
                results[name] = Result(name, "proposed", threads, k, pre)
    steps.update(passes)
    return steps, results, passes


def check_same_capture(
    reference: GradientComputer,
    patched: GradientComputer,
    batch: dict[str, torch.Tensor],
    request: CaptureRequest,
) -> None:
    """The patched capture must return what the library's returns (float rounding aside)."""
    outs = []
    for computer in (reference, patched):
        with computer.session():
            outs.append(computer.compute(batch, request))
    pairs = [(outs[0].rows, outs[1].rows)] if request.rows else []
    for attr in ("factor_grads", "cov_in", "cov_out"):
        ref, new = getattr(outs[0], attr), getattr(outs[1], attr)
        pairs += [(ref[key], new[key]) for key in ref]
    for a, b in pairs:
        scale = a.abs().max().clamp(min=1e-30)
        if float((a.double() - b.double()).abs().max() / scale) > 1e-4:
            raise RuntimeError("the proposed capture does not reproduce the library's output")


def instrument(passes: dict[str, FactGraSSPass], results: dict[str, Result]) -> None:
    """One extra call per factgrass variant with the hook (and stats update) timed."""
    for name, step in passes.items():
        step.stats_s = 0.0
        step.prepare()
        try:
            with timed_hooks(step.computer.capture) as spent:
                start = time.perf_counter()
                step.run()
                results[name].instrumented_s = time.perf_counter() - start
        finally:
            step.finish()
        results[name].hook_s = spent[0]
        results[name].stats_s = step.stats_s if step.stats is not None else None


def profile(steps: dict[str, Step], names: list[str], rows: int = 15) -> dict[str, str]:
    """torch.profiler top ops (by self CPU time) of one call of each named step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for name in names:
        step = steps[name]
        step.prepare()
        try:
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                step.run()
        finally:
            step.finish()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        print(f"\n--- torch.profiler, {name} ---\n{tables[name]}", flush=True)
    return tables


def summarise(results: dict[str, Result], tokens: int) -> None:
    for r in results.values():
        if r.times_s:
            r.median_s = statistics.median(r.times_s)
            r.tokens_per_s = tokens / r.median_s
        if r.cpu_times_s:
            r.cpu_median_s = statistics.median(r.cpu_times_s)
            r.cpu_tokens_per_s = tokens / r.cpu_median_s
    full, act = results[FULL], results[ACTIVATION]
    for r in results.values():
        if r.tokens_per_s and full.tokens_per_s and act.tokens_per_s:
            r.x_full, r.x_activation = r.tokens_per_s / full.tokens_per_s, r.tokens_per_s / act.tokens_per_s
        if r.cpu_tokens_per_s and full.cpu_tokens_per_s and act.cpu_tokens_per_s:
            r.cpu_x_full = r.cpu_tokens_per_s / full.cpu_tokens_per_s
            r.cpu_x_activation = r.cpu_tokens_per_s / act.cpu_tokens_per_s


def print_table(results: list[Result]) -> None:
    head = ["threads", "variant", "wall s", "tok/s", "x full", "x act", "cpu s", "x full", "x act"]
    head += ["hooks s", "stats s"]
    widths = [7, 36, 6, 6, 6, 6, 6, 6, 6, 7, 7]
    line = lambda cells: "  ".join(
        c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    print(line(["", "", "", "wall", "clock", "", "process", "CPU", "time", "", ""]))
    print(line(head))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    for r in results:
        cells = [str(r.threads), r.name, fmt(r.median_s, ".2f"), fmt(r.tokens_per_s, ".0f")]
        cells += [fmt(r.x_full, ".2f"), fmt(r.x_activation, ".2f"), fmt(r.cpu_median_s, ".2f")]
        cells += [fmt(r.cpu_x_full, ".2f"), fmt(r.cpu_x_activation, ".2f")]
        cells += [fmt(r.hook_s, ".2f"), fmt(r.stats_s, ".3f")]
        print(line(cells))
    print("x full / x act: throughput relative to the full / activation-only backward (wall clock, then")
    print("process CPU time, which other jobs on a shared machine disturb less at 1 thread).")
    print("hooks s / stats s: seconds inside the capture hooks / StatsAccumulator.update in one extra")
    print("instrumented call of that variant (not part of the medians).")


def goals(results: list[Result]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        if (
            r.kind not in ("factgrass", "ekfac", "proposed")
            or r.proj_dim != DEFAULT_PROJ_DIM
            or r.x_full is None
        ):
            continue
        row: dict[str, Any] = {"threads": r.threads, "variant": r.name}
        for clock, x_act, x_full in (
            ("wall", r.x_activation, r.x_full),
            ("cpu", r.cpu_x_activation, r.cpu_x_full),
        ):
            row[clock] = {
                "x_activation": x_act,
                "x_full": x_full,
                "met": x_act is not None
                and x_full is not None
                and x_act >= GOAL_VS_ACTIVATION
                and x_full >= GOAL_VS_FULL,
            }
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (numbers measured with it are in the module docstring); returns the report."""
    args = parse_args(argv)
    tokens = args.batch * args.seq
    settings: dict[str, Any] = {
        "model": "GPT2LMHeadModel (random weights, dropout 0, eval)",
        "layers": args.layers,
        "width": args.width,
        "heads": args.heads,
        "vocab": args.vocab,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_batch": tokens,
        "proj_dims": args.proj_dims,
        "ekfac_proj_dims": args.ekfac_proj_dims,
        "sparsify_factor": GraSSConfig().sparsify_factor,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "loss": "per_example_loss, sum reduction, summed over the batch",
        "dtype": "float32 model, float16 rows",
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "kernels": "torch reference (CPU)",
    }
    model = build_model(args)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    settings["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"GPT-2-shaped model: {args.layers} layers x {args.width} wide, {args.heads} heads, vocab {args.vocab} "
        f"({n_params / 1e6:.1f}M parameters), B={args.batch}, T={args.seq}, median of {args.repeats} after "
        f"{args.warmup} warm-up, torch {torch.__version__}, {settings['cpu']}",
        flush=True,
    )
    all_results: list[Result] = []
    profiles: dict[str, dict[str, str]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        steps, results, passes = make_steps(model, batch, args)
        n_targets = len(next(iter(passes.values())).computer.targets) if passes else 0
        print(f"\nthreads={threads}: {len(steps)} variants, {n_targets} target modules", flush=True)
        start = time.perf_counter()
        times, cpu = time_round_robin(steps, args.warmup, args.repeats)
        for name, ts in times.items():
            results[name].times_s, results[name].cpu_times_s = ts, cpu[name]
        instrument(passes, results)
        summarise(results, tokens)
        print(f"  threads={threads} done in {time.perf_counter() - start:.0f}s", flush=True)
        if args.profile:
            default = next((n for n, r in results.items() if r.kind == "ekfac"), None) or next(
                iter(passes), None
            )
            profiles[str(threads)] = profile(steps, [ACTIVATION] + ([default] if default else []))
        all_results += results.values()
        del steps, passes

    print()
    print_table(all_results)
    goal_rows = goals(all_results)
    for g in goal_rows:
        for clock in ("wall", "cpu"):
            v = g[clock]
            print(
                f"goal ({g['variant']}, threads={g['threads']}, {clock} clock): >= {GOAL_VS_ACTIVATION}x "
                f"activation backward (measured {v['x_activation']:.2f}x) and >= {GOAL_VS_FULL}x full backward "
                f"(measured {v['x_full']:.2f}x) -> {'met' if v['met'] else 'NOT met'}"
            )
    report: dict[str, Any] = {
        "settings": settings,
        "results": [asdict(r) for r in all_results],
        "goals": goal_rows,
    }
    if profiles:
        report["profiles"] = profiles
    return emit_report(report, args.json_out)


if __name__ == "__main__":
    main()
