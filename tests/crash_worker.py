"""Builds small gradient caches for tests/test_reliability.py, and kills them at every durable step.

``python tests/crash_worker.py sweep DIR`` is the crash test: it builds a reference cache, counts the
durable steps of that build (every temp-file create, write, fsync, rename, directory fsync and
delete of the cache writer, see ``hf_grass.cache.files``), then for each step N builds a fresh cache
in a child process that SIGKILLs itself right before step N (``arm_fault(N)``), resumes it in
another child, and compares the result with the reference byte for byte. The children are forked
from this process, which has imported torch and hf_grass once but computes nothing itself, so each
crash is a real process dying by SIGKILL (no ``finally``, no ``atexit``, its lock released by the
kernel), without paying a Python start-up per run. It prints one JSON line per step and a summary.

No transformers import (a plain torch LM) so that the runs are quick.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

from hf_grass.attribution import AttributionPass, Batching
from hf_grass.cache import GradientCache
from hf_grass.cache.files import arm_fault, trace_durable_steps
from hf_grass.capture import GradientComputer
from hf_grass.config import GraSSConfig
from hf_grass.data import ExampleSource

VOCAB = 30
N_EXAMPLES = 36
# the sweep's build: 2 shards (3 + 2 examples): the first commit, and a later one that also deletes
# the previous statistics file, so every kind of durable step is in the sweep
SWEEP_EXAMPLES = 5


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 24)
        self.head = nn.Linear(24, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        h = torch.tanh(self.hidden(self.embed(input_ids)))
        return {"logits": self.head(h)}


def examples(n: int = N_EXAMPLES) -> list[dict]:
    """Deterministic examples of 3 to 8 tokens."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 9, (N_EXAMPLES,), generator=gen)
    rows = [{"input_ids": torch.randint(0, VOCAB, (int(n),), generator=gen).tolist()} for n in lengths]
    return rows[:n]


def config() -> GraSSConfig:
    return GraSSConfig(compressor="factgrass", proj_dim=16, shard_size=3, ekfac_sample_size=9)


def build(path: str, verify_existing: bool = False, n_examples: int = N_EXAMPLES) -> None:
    computer = GradientComputer(TinyLM(), config())
    AttributionPass(
        computer, ExampleSource(examples(n_examples)), path, Batching(2, disable_progress=True)
    ).run(verify_existing=verify_existing)


def cache_bytes(path: Path) -> dict[str, bytes]:
    """Every file a verified open lists, and the manifest, by relative path."""
    cache = GradientCache(path, verify=True)
    files = {str(p.relative_to(path)): p.read_bytes() for p, _ in cache.files()}
    files["manifest.json"] = (path / "manifest.json").read_bytes()
    return files


# ---- the sweep ------------------------------------------------------------------------------------


def _in_child(fn, *args) -> int:
    """Run ``fn(*args)`` in a forked child; its wait status (exit 0 on success, 1 on an exception)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _reference(path: Path, trace_file: Path) -> None:
    trace = trace_durable_steps()
    arm_fault(None)
    build(str(path), n_examples=SWEEP_EXAMPLES)
    trace_file.write_text(json.dumps(trace))


def _crash_at(path: Path, step: int) -> None:
    arm_fault(step)
    build(str(path), n_examples=SWEEP_EXAMPLES)  # SIGKILLs itself before finishing


def _resume_and_compare(path: Path, reference: Path, report: Path) -> None:
    problems = []
    if (path / "manifest.json").exists():
        try:  # whatever survived the kill opens as a valid, checksummed cache
            GradientCache(path, verify=True)
        except Exception as err:
            problems.append(f"after the kill: {type(err).__name__}: {err}")
    build(str(path), n_examples=SWEEP_EXAMPLES)
    if not GradientCache(path).manifest["complete"]:
        problems.append("the resumed cache is not complete")
    got, want = cache_bytes(path), cache_bytes(reference)
    if got != want:
        differ = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        problems.append(f"resumed cache differs from the reference in {differ}")
    leftovers = sorted(p.name for p in path.rglob("*") if ".tmp-" in p.name)
    if leftovers:
        problems.append(f"temp files left after the resume: {leftovers}")
    report.write_text(json.dumps(problems))


def sweep(root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    reference, trace_file = root / "reference", root / "trace.json"
    status = _in_child(_reference, reference, trace_file)
    if status != 0:
        print(json.dumps({"error": f"the reference build failed (wait status {status})"}), flush=True)
        return 1
    trace = json.loads(trace_file.read_text())
    failures = 0
    for step in range(1, len(trace) + 1):
        target, report = root / f"step{step}", root / f"step{step}.json"
        status = _in_child(_crash_at, target, step)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        problems = [] if killed else [f"the build was not killed at step {step} (wait status {status})"]
        if _in_child(_resume_and_compare, target, reference, report) != 0:
            problems.append("the resume raised (traceback on stderr)")
        elif report.exists():
            problems += json.loads(report.read_text())
        failures += bool(problems)
        print(
            json.dumps({"step": step, "kind": trace[step - 1], "killed": killed, "problems": problems}),
            flush=True,
        )
        shutil.rmtree(target, ignore_errors=True)
    print(json.dumps({"steps": len(trace), "failures": failures}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "sweep":
        raise SystemExit("usage: python tests/crash_worker.py sweep DIR")
    raise SystemExit(sweep(Path(sys.argv[2])))
