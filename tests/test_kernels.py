"""Triton kernels vs the torch reference, and the kernel dispatcher.

The kernels run on CPU under the Triton interpreter. ``TRITON_INTERPRET=1`` must be set before
``triton`` is imported, which this pytest process may already have done, so the checks live in
``kernel_interpreter_checks.py`` and run in subprocesses; each check is reported here as its own test.
The two 64-bit offset checks get a subprocess each: if a kernel formed an int32 offset there, the
interpreter would dereference a wrapped address and could crash the process rather than fail a check.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_grass import kernels
from hf_grass.kernels import reference

HELPER = Path(__file__).with_name("kernel_interpreter_checks.py")
COMPILE_HELPER = Path(__file__).with_name("kernel_compile_checks.py")
REPO = HELPER.parents[1]
NO_NVIDIA_BACKEND = 77  # kernel_compile_checks.py's exit status when triton cannot target CUDA

# Every check of the helper, grouped by subprocess (test_every_check_is_listed keeps this in sync).
CHECK_GROUPS: tuple[tuple[str, ...], ...] = (
    (
        "factgrass_fp32",
        "factgrass_fp16",
        "factgrass_bf16",
        "factgrass_fp64",
        "factgrass_x_fp16_delta_fp32",
        "factgrass_x_bf16_delta_fp64",
        "factgrass_bias_index_not_in_mask",
        "factgrass_non_contiguous",
        "factgrass_empty",
        "factgrass_shape_errors",
        "sjlt_dtypes",
        "sjlt_non_contiguous",
        "dispatcher_uses_triton",
        "compressor_end_to_end",
    ),
    ("int64_offsets_factgrass",),
    ("int64_offsets_sjlt",),
)
ALL_CHECKS = [name for group in CHECK_GROUPS for name in group]


def _interpreter_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", HF_GRASS_KERNELS="triton")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _run_helper(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HELPER), *args],
        env=_interpreter_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@functools.cache
def _group_results(group: tuple[str, ...]) -> tuple[dict[str, dict], int, str]:
    """Run one group of checks in a fresh interpreter-mode process: (results by name, returncode, stderr)."""
    proc = _run_helper(*group)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["name"]] = record
    return results, proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def triton_installed() -> None:
    pytest.importorskip("triton")


@pytest.mark.parametrize("name", ALL_CHECKS)
def test_triton_kernel_matches_reference(name: str, triton_installed: None) -> None:
    group = next(g for g in CHECK_GROUPS if name in g)
    results, returncode, stderr = _group_results(group)
    if name not in results:
        pytest.fail(
            f"the interpreter subprocess died before reporting {name} (exit {returncode}):\n{stderr[-3000:]}"
        )
    record = results[name]
    assert record["ok"], record["detail"]


def test_every_check_is_listed(triton_installed: None) -> None:
    proc = _run_helper("--list")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(proc.stdout.split()) == sorted(ALL_CHECKS)


def test_kernels_compile_for_cuda_targets(triton_installed: None, tmp_path: Path) -> None:
    """The real (non-interpreted) compile to sm_90 / sm_80 cubins, which needs no GPU."""
    # a private cache: a warm ~/.triton cache would skip the compile, and HOME may be read-only
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(COMPILE_HELPER)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if proc.returncode == NO_NVIDIA_BACKEND:
        pytest.skip("this triton build has no NVIDIA backend")
    failures = [r for r in map(json.loads, filter(None, proc.stdout.splitlines())) if not r["ok"]]
    assert proc.returncode == 0 and not failures, "\n".join(
        [f"exit {proc.returncode}", proc.stderr[-3000:]] + [f"{r['name']}:\n{r['detail']}" for r in failures]
    )


# ---- dispatcher (in process; only the forced-triton error needs triton) ----------------------------


def test_backend_torch_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_GRASS_KERNELS", "torch")
    assert kernels.backend_for(torch.zeros(2)) == "torch"
    monkeypatch.setenv("HF_GRASS_KERNELS", "TORCH")  # case-insensitive
    assert kernels.backend_for(torch.zeros(2)) == "torch"


def test_backend_auto_on_cpu_is_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_GRASS_KERNELS", raising=False)
    assert kernels.backend_for(torch.zeros(2)) == "torch"
    monkeypatch.setenv("HF_GRASS_KERNELS", "auto")
    assert kernels.backend_for(torch.zeros(2)) == "torch"


@pytest.mark.parametrize("value", ["cuda", "tritonn", "1"])
def test_backend_invalid_value(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("HF_GRASS_KERNELS", value)
    with pytest.raises(ValueError, match="HF_GRASS_KERNELS"):
        kernels.backend_for(torch.zeros(2))


def test_backend_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("HF_GRASS_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.backend_for(torch.zeros(2))


def test_torch_path_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_GRASS_KERNELS", "torch")
    gen = torch.Generator().manual_seed(0)
    x, delta = torch.randn(2, 5, 9, generator=gen), torch.randn(2, 5, 7, generator=gen)
    in_idx, out_idx = torch.tensor([1, 4, 8, 9]), torch.tensor([0, 3, 6])
    rows = torch.randint(0, 8, (1, 12), generator=gen)
    signs = torch.ones(1, 12)
    got = kernels.factgrass_project(x, delta, in_idx, out_idx, rows, signs, 8, bias_index=9)
    want = reference.factgrass_project(x, delta, in_idx, out_idx, rows, signs, 8, 9)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the bias column (index 9) is the implicit ones column: G'[:, o, -1] = sum_t delta[:, t, o]
    gp = reference.masked_outer(x, delta, in_idx, out_idx, 9)
    torch.testing.assert_close(gp[:, :, -1], delta[:, :, out_idx].sum(1))
