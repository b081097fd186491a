"""Tokens/s of the FactGraSS attribution pass against a training step's backward, on the CPU.

One batch of random token ids (B x T, every token supervised) goes through a GPT-2-shaped
``GPT2LMHeadModel`` (random weights, dropout 0, eval mode) with the same model inputs
(``GradientComputer.model_inputs``) and the same per-example loss in every variant:

- ``full backward``: every parameter requires grad (a training step without the optimizer).
- ``activation backward``: parameters frozen, the embedding output made to require grad, so the
  backward computes activation gradients only: the attribution pass minus the capture hooks.
- ``factgrass k=K identity``: ``GradientComputer.compute`` with rows only, cast to fp16 (what the
  pass runs with ``preconditioner="identity"``).
- ``factgrass k=K ekfac``: the library default, one batch of the main pass: rows, factor-space
  gradients and covariances, then ``StatsAccumulator.update``, rows cast to fp16.
- ``ekfac warm-up k=K``: the covariance-only pass over the first ``ekfac_sample_size`` examples.

Targets are the library default (every Linear / Conv1D, ``lm_head`` with its tied embedding's use, and the
position embedding; before the embeddings were captured, the Linear / Conv1D layers only). Variants are timed
round robin (``benchmarks._common.time_interleaved``); one extra call of each factgrass variant
times the capture hooks. Measured numbers, with their commands, are in docs/benchmarks.md.

    python -m benchmarks.attribution_pass                    # GPT-2 small, B=4, T=256, k in {256,1024,4096}
    python -m benchmarks.attribution_pass --quick            # 2 layers x 256 wide, B=2, T=128 (< 1 min)
    python -m benchmarks.attribution_pass --smoke            # 1 layer x 64 wide, B=2, T=16, once: checks it runs
    python -m benchmarks.attribution_pass --threads 1 2 --json-out pass.json
    python -m benchmarks.attribution_pass --profile          # + torch.profiler top ops of two variants
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

from benchmarks._common import cpu_name, emit_report, parse_with_smoke, time_interleaved
from hf_grass.attribution.runner import module_specs
from hf_grass.capture import CaptureRequest, GradientComputer, per_example_loss
from hf_grass.capture.hooks import GradientCapture
from hf_grass.config import GraSSConfig
from hf_grass.precondition import StatsAccumulator, preconditioner_class
from hf_grass.precondition.warmup import fit_masked_basis

DEFAULT_PROJ_DIM = GraSSConfig().proj_dim  # 1024
# The goals for the default factgrass pass
GOAL_VS_ACTIVATION, GOAL_VS_FULL = 0.9, 1.2
FULL, ACTIVATION = "full backward", "activation backward"
SMOKE = {"layers": 1, "width": 64, "vocab": 256, "batch": 2, "seq": 16, "repeats": 1, "warmup": 0,
         "proj_dims": [64], "ekfac_proj_dims": [DEFAULT_PROJ_DIM]}  # fmt: skip


@dataclass
class Result:
    """One variant at one thread count."""

    name: str
    kind: str  # full | activation | factgrass | ekfac | ekfac-warmup
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
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler top ops")
    parser.add_argument(
        "--quick", action="store_true", help="small model (2 x 256), B=2, T=128, k in {256, 1024}"
    )
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")
    args = parse_with_smoke(parser, argv, SMOKE)
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
    """``GradientComputer.compute`` in a session, plus what the pass does with the result."""

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
            self.stats.update(grads)
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

    patched = "_backward_hook" in vars(capture)
    capture._backward_hook = wrapper  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        if patched:
            capture._backward_hook = original  # type: ignore[method-assign]
        else:
            del capture._backward_hook  # back to the class method


def time_steps(steps: dict[str, Step], warmup: int, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per ``run`` of each step (``prepare`` / ``finish`` untimed), after
    checking that every variant computes the same per-example losses (same model, inputs, loss)."""
    reference: torch.Tensor | None = None
    for name, step in steps.items():
        with stepping(step):
            losses = step.run()
        if reference is None:
            reference = losses
        elif not torch.allclose(losses, reference, rtol=1e-4, atol=1e-3):
            raise RuntimeError(f"{name}: losses {losses.tolist()} differ from {reference.tolist()}")
    calls = {name: step.run for name, step in steps.items()}
    timed = time_interleaved(calls, repeats, warmup, around=lambda name: stepping(steps[name]), progress=True)
    return timed.wall, timed.cpu


@contextlib.contextmanager
def stepping(step: Step) -> Iterator[None]:
    step.prepare()
    try:
        yield
    finally:
        step.finish()


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
        warm = CaptureRequest(rows=False, covariances=True)  # the warm-up's request
        sums = StatsAccumulator(specs, frozenset({"covariances"}))
        with computer.session():
            sums.update(computer.compute(batch, warm))
        basis = fit_masked_basis(specs, sums.sums, config.whitening_damping)
        needs = preconditioner_class(computer.config.preconditioner).statistics(eigen_masks=False)
        stats = StatsAccumulator(specs, needs, basis, device=computer.device)
        # the main pass's request (the pass itself whitens rows built from the factor gradients)
        request = CaptureRequest(rows=True, factor_grads=stats.needs_factor_grads, covariances=stats.needs_covariances)
        name = f"factgrass k={k} ekfac"
        passes[name] = FactGraSSPass(computer, batch, request, stats)
        results[name] = Result(name, "ekfac", threads, k, "ekfac")
        name = f"ekfac warm-up k={k}"
        passes[name] = FactGraSSPass(computer, batch, warm)
        results[name] = Result(name, "ekfac-warmup", threads, k, "ekfac")
    steps.update(passes)
    return steps, results, passes


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
            r.kind not in ("factgrass", "ekfac")
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
    """Run the benchmark (measured numbers are in docs/benchmarks.md); returns the report."""
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
        times, cpu = time_steps(steps, args.warmup, args.repeats)
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
