"""One prepared GPU check of hf_grass (issue 18, item 5): a JSON and a table from a single run.

Sections, in the order they run (the cheap checks first, the Llama-8B warm-up, the one most likely
to run long, last):

1. ``environment``: GPU, memory, versions, commit, date.
2. ``kernels``: the Triton kernels against the torch path, equal and deterministic bit for bit, and
   a short pass with each (``benchmarks._gpu_checks``).
3. ``process_group``: a world-size-1 NCCL group through a build and an exact query, against the
   same run without a group and under gloo (``benchmarks._gpu_dist``, in a child process).
4. ``padding``: a padded bf16 batch's rows against each example alone, per attention kernel.
5. ``llama_build``: a Llama-3.1-8B-shaped model, random bf16 weights, built on the GPU.
6. ``llama_plain``: tokens/s of a plain forward + backward (every parameter requires grad).
7. ``llama_compression``: FactGraSS (input masks) against LoGra at each k, the seed's table.
8. ``llama_default_pass``: ``run_attribution_pass`` with ``GraSSConfig()``, warm-up timed apart,
   beside a plain forward + backward at the same depth. The warm-up's eigendecompositions grow
   with the depth, so unless ``--pass-layers`` is given the pass first runs on 2 layers (the
   probe) and then on the most layers the budget left allows (all 32 if it fits).

Every section runs in its own try/except and under an alarm at its cap or the global budget
(``--budget-s``), whichever comes first; a section that would start past the budget is recorded
as skipped. The JSON is rewritten after every section (and after each measurement inside the long
ones), so a run cut short still leaves its numbers. When the Triton checks raise or give garbage,
the later sections run with ``HF_GRASS_KERNELS=torch`` (recorded in the settings), since a kernel
failure would otherwise stop every Llama measurement.

    PYTHONPATH=. python -m benchmarks.gpu_suite --out DIR               # on one GPU, < 8 minutes
    PYTHONPATH=. python -m benchmarks.gpu_suite --out DIR --pass-layers 8   # a shallower warm-up
    PYTHONPATH=. OMP_NUM_THREADS=1 python -m benchmarks.gpu_suite --out DIR --dry-run   # CPU, tiny

Writes ``DIR/gpu_suite.json`` and ``DIR/gpu_suite.md`` and prints the table last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks import _gpu_llama as llama
from benchmarks._gpu_checks import kernels_section, padding_section
from benchmarks._gpu_common import SectionSkipped, free_memory, peak_gib, reset_peak
from benchmarks._gpu_report import markdown, summary

ROOT = Path(__file__).resolve().parent.parent
# seconds each section may take at most on the GPU (the budget may cut it shorter)
CAPS = {"kernels": 90, "process_group": 90, "padding": 60, "llama_build": 90, "llama_plain": 60,
        "llama_compression": 150}  # fmt: skip
MIN_START_S = 5.0  # a section that would start with less budget left is skipped


class BudgetExceeded(BaseException):
    """Raised by the alarm; a BaseException so the library's ``except Exception`` cannot swallow it."""


class Suite:
    """The report, the budget and the incremental JSON."""

    def __init__(self, out: Path, budget_s: float, settings: dict[str, Any]):
        self.out = out
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.report: dict[str, Any] = {"settings": settings, "sections": {}}
        self.state: dict[str, Any] = {}  # objects shared between sections (the Llama model)
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.report["elapsed_s"] = self.elapsed()
        self.report["summary"] = summary(self.report)
        path = self.out / "gpu_suite.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        tmp.replace(path)

    def run(self, name: str, fn: Callable[[dict[str, Any]], None], cap_s: float | None) -> None:
        entry: dict[str, Any] = {"status": "running", "results": {}}
        self.report["sections"][name] = entry
        left = self.budget_s - self.elapsed()
        if left < MIN_START_S:
            entry.update(
                status="skipped",
                reason=f"budget of {self.budget_s:.0f}s spent ({self.elapsed():.0f}s elapsed)",
            )
            self.save()
            print(f"[gpu_suite] {name}: skipped (budget spent)", flush=True)
            return
        limit = left if cap_s is None else min(left, cap_s)
        print(f"[gpu_suite] {name}: start (limit {limit:.0f}s, {self.elapsed():.0f}s elapsed)", flush=True)
        start = time.perf_counter()
        try:
            with alarm(limit):
                fn(entry["results"])
            entry["status"] = "ok"
        except BudgetExceeded:
            entry.update(status="timeout", error=f"stopped after {limit:.0f}s (section cap or global budget)")
        except SectionSkipped as why:
            entry.update(status="skipped", reason=str(why))
        except Exception as err:  # noqa: BLE001 - recorded; the next section still runs
            entry.update(
                status="error", error=repr(err)[:2000], traceback=traceback.format_exc(limit=12)[-4000:]
            )
        finally:
            entry["seconds"] = time.perf_counter() - start
            entry["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            free_memory()
        self.save()
        print(f"[gpu_suite] {name}: {entry['status']} in {entry['seconds']:.1f}s", flush=True)


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise ``BudgetExceeded`` in the main thread after ``seconds`` (between Python bytecodes: a
    long C call finishes first)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise BudgetExceeded

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- sections ---------------------------------------------------------------------------------------


def source_fingerprint() -> str:
    """sha256 of hf_grass/**/*.py and benchmarks/*.py (names and bytes): the code that ran, where
    the tree copied to the GPU machine has no git metadata."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("hf_grass/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def git_commit() -> str | None:
    for var in ("HF_GRASS_COMMIT", "GIT_COMMIT"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def environment(device: torch.device, results: dict[str, Any]) -> None:
    def version(name: str) -> str | None:
        try:
            return __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as None
            return None

    from hf_grass import kernels

    results.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=git_commit(),
        source_sha256=source_fingerprint(),
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=version("triton"),
        transformers=version("transformers"),
        accelerate=version("accelerate"),
        peft=version("peft"),
        optional_absent=[m for m in ("datasets", "faiss", "bm25s") if not _importable(m)],
        device=str(device),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        results.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            kernel_backend=kernels.backend_for(torch.empty(1, device=device)),
        )


def triton_broken(section: dict[str, Any]) -> str | None:
    """Why the Triton path cannot be used for the rest of the run (it raised, timed out or gave
    garbage), or None. A small mismatch is reported, not acted on."""
    if section.get("status") == "skipped":
        return None
    if section.get("status") != "ok":
        return f"the kernels section ended with {section.get('status')}: {section.get('error')}"
    res = section["results"]
    entries = [*res.get("kernel_cases", []), *res.get("pass_rows", {}).values(), res.get("default_cache", {})]
    for entry in entries:
        if "error" in entry:
            return f"a kernel check raised: {entry['error'][:300]}"
        for key, value in entry.items():
            if key.endswith(("rel_err", "_rel")) and not value <= 1e-2:  # also NaN
                return f"{key}={value} in {entry.get('kernel', '')} {entry.get('module', '')}".strip()
    return None


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def process_group(dry_run: bool, timeout_s: float, results: dict[str, Any]) -> None:
    """``benchmarks._gpu_dist`` in a child process, killed at ``timeout_s``."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_suite_dist_{os.getpid()}.json"
    cmd = [sys.executable, "-m", "benchmarks._gpu_dist", str(out)] + (["--dry-run"] if dry_run else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        results["returncode"] = done.returncode
        if done.returncode != 0:
            results["stderr_tail"] = done.stderr[-3000:]
    except subprocess.TimeoutExpired:
        results["timeout"] = f"the child ran past {timeout_s:.0f}s and was killed"
    if out.exists():
        results.update(json.loads(out.read_text()))
        out.unlink()
    if "error" in results:
        raise RuntimeError(f"process-group child failed: {results['error']}")
    if "timeout" in results:
        raise RuntimeError(results["timeout"])


def llama_sections(
    suite: Suite, run: llama.LlamaRun, caps: dict[str, float | None], want: Callable[[str], bool]
) -> None:
    device = torch.device(run.device)

    def build(results: dict[str, Any]) -> None:
        reset_peak(device)
        start = time.perf_counter()
        model = llama.build_llama(run.shape, run.seq, device, run.torch_dtype)
        llama.sync(device)
        suite.state["model"] = model
        results.update(
            build_s=time.perf_counter() - start, peak_gib=peak_gib(device), **llama.model_facts(model)
        )
        suite.state["batch"] = llama.token_batch(run.shape["vocab"], run.batch, run.seq, device)

    def need_model() -> torch.nn.Module:
        if "model" not in suite.state:
            raise SectionSkipped("the model was not built (see llama_build)")
        return suite.state["model"]

    def plain(results: dict[str, Any]) -> None:
        results.update(llama.plain_forward_backward(need_model(), run, suite.state["batch"]))

    def compression(results: dict[str, Any]) -> None:
        llama.compression_table(need_model(), run, suite.state["batch"], results, suite.save)

    def default_pass(results: dict[str, Any]) -> None:
        def left() -> float:
            return suite.budget_s - suite.elapsed()

        llama.default_pass_section(need_model(), run, suite.state["batch"], results, suite.save, left)

    suite.run("llama_build", build, caps["llama_build"])  # the others need it
    if want("llama_plain"):
        suite.run("llama_plain", plain, caps["llama_plain"])
    if want("llama_compression"):
        suite.run("llama_compression", compression, caps["llama_compression"])
    if want("llama_default_pass"):
        suite.run("llama_default_pass", default_pass, None)  # whatever budget is left
    suite.state.clear()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for gpu_suite.json and gpu_suite.md"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU (CI: the script cannot rot)"
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="global time budget (seconds)")
    parser.add_argument(
        "--layers", type=int, default=None, help="decoder layers of the Llama model (default 32)"
    )
    parser.add_argument("--pass-layers", type=int, default=None,
                        help="layers kept for the default-pass section, whose warm-up grows with depth "
                        "(default: the most the budget allows, from a probe at 2 layers)")  # fmt: skip
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per forward/backward (default 4)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="k per module, compression table")
    parser.add_argument("--pass-examples", type=int, default=None, help="examples of the default pass (24)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (median)")
    parser.add_argument(
        "--sections", nargs="+", default=None, help="run only these sections (names as in the JSON)"
    )
    return parser.parse_args(argv)


def llama_run(args: argparse.Namespace, device: torch.device) -> llama.LlamaRun:
    dry = args.dry_run
    shape = dict(llama.LLAMA_TINY if dry else llama.LLAMA_8B)
    if args.layers is not None:
        shape["layers"] = args.layers
    return llama.LlamaRun(
        shape=shape,
        seq=args.seq or (32 if dry else 1024),
        batch=args.batch or (2 if dry else 4),
        pass_examples=args.pass_examples or (8 if dry else 24),
        pass_layers=None if args.pass_layers is None else min(args.pass_layers, shape["layers"]),
        ks=tuple(args.ks or ((16, 64) if dry else (1024, 4096))),
        warmup=1,
        repeats=args.repeats or (2 if dry else 5),
        device=str(device),
        dtype="bfloat16",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    run = llama_run(args, device)
    settings = {"argv": sys.argv[1:], "dry_run": args.dry_run, "budget_s": args.budget_s, "llama": llama.run_dict(run),
                "targets": {"default_pass_over_plain_max": 1.3, "factgrass_over_logra_min": 2.6}}  # fmt: skip
    suite = Suite(args.out, args.budget_s, settings)
    caps: dict[str, float | None] = {k: (None if args.dry_run else v) for k, v in CAPS.items()}
    wanted = set(args.sections) if args.sections else None

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    if want("environment"):
        suite.run("environment", lambda r: environment(device, r), None)
    if want("kernels"):
        suite.run("kernels", lambda r: kernels_section(device, r, suite.save), caps["kernels"])
        broken = triton_broken(suite.report["sections"]["kernels"])
        if broken:  # the Llama sections would fail with it (a kernel failure raises): measure torch's path
            os.environ["HF_GRASS_KERNELS"] = "torch"
            settings["kernels_forced_torch"] = broken
            print(f"[gpu_suite] HF_GRASS_KERNELS=torch from here on: {broken}", flush=True)
    if want("process_group"):  # a child process, killed at its deadline (no alarm can stop NCCL)

        def child(results: dict[str, Any]) -> None:
            left = max(args.budget_s - suite.elapsed(), 1.0)
            process_group(args.dry_run, min(caps["process_group"] or left, left), results)

        suite.run("process_group", child, None)
    if want("padding"):
        suite.run("padding", lambda r: padding_section(device, args.dry_run, r, suite.save), caps["padding"])
    if any(want(name) for name in ("llama_build", "llama_plain", "llama_compression", "llama_default_pass")):
        llama_sections(suite, run, caps, want)
    suite.save()
    table = markdown(suite.report)
    (args.out / "gpu_suite.md").write_text(table)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
