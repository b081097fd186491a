"""Triton kernels vs the torch reference, the SJLT's inverse index, and the kernel dispatcher.

The kernels run on CPU under the Triton interpreter. ``TRITON_INTERPRET=1`` must be set before
``triton`` is imported, which this pytest process may already have done, so the checks live in
``kernel_interpreter_checks.py`` and run in subprocesses; each check is reported here as its own test.
The two 64-bit offset checks get a subprocess each: if a kernel formed an int32 offset there, the
interpreter would dereference a wrapped address and could crash the process rather than fail a check.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_grass import kernels
from hf_grass.compressors import make_compressor
from hf_grass.config import GraSSConfig
from hf_grass.kernels import SJLTMap, reference

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
        "sjlt_bitwise_in_order",
        "factgrass_exact_inputs_match_index_add",
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
    got = kernels.factgrass_project(x, delta, in_idx, out_idx, SJLTMap(rows, signs, 8), bias_index=9)
    want = reference.factgrass_project(x, delta, in_idx, out_idx, rows, signs, 8, 9)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn(3, 12, generator=gen)
    got = kernels.sjlt_project(g, SJLTMap(rows, signs, 8))
    torch.testing.assert_close(got, reference.sjlt_project(g, rows, signs, 8), rtol=0, atol=0)
    # the bias column (index 9) is the implicit ones column: G'[:, o, -1] = sum_t delta[:, t, o]
    gp = reference.masked_outer(x, delta, in_idx, out_idx, 9)
    torch.testing.assert_close(gp[:, :, -1], delta[:, :, out_idx].sum(1))


# ---- the SJLT's inverse index and the ordered (deterministic) torch path ---------------------------


def _block_sjlt(n: int, k: int, s: int, seed: int) -> SJLTMap:
    from hf_grass.compressors.sjlt import make_sjlt

    return make_sjlt(torch.Generator().manual_seed(seed), n, k, s)


@pytest.mark.parametrize(("n", "k", "s"), [(1, 4, 1), (100, 8, 1), (300, 16, 4), (50, 64, 2)])
def test_gather_index_inverts_the_rows(n: int, k: int, s: int) -> None:
    sjlt = _block_sjlt(n, k, s, seed=n + k)
    cols, vals = sjlt.gather_index()
    assert cols.dtype == torch.int64 and vals.dtype == torch.float32 and cols.shape == vals.shape
    assert cols.shape[1] == k
    # every (replica, input) appears exactly once, in the column of its row, with its sign
    seen = []
    for r in range(k):
        entries = [(int(j), float(v)) for j, v in zip(cols[:, r], vals[:, r]) if j >= 0]
        pad = cols[len(entries) :, r]
        assert bool((pad == -1).all()) and bool((vals[len(entries) :, r] == 0).all()), (
            "padding only at the end"
        )
        js = [j for j, _ in entries]
        assert js == sorted(js), "inputs of a row in ascending order (index_add_'s order)"
        for j, v in entries:
            replicas = (sjlt.rows[:, j] == r).nonzero().flatten().tolist()
            assert len(replicas) == 1 and v == float(sjlt.signs[replicas[0], j])
            seen.append((replicas[0], j))
    assert sorted(seen) == [(rep, j) for rep in range(s) for j in range(n)]
    assert cols.shape[0] == int(torch.bincount(sjlt.rows.flatten(), minlength=k).max())


def test_gather_index_order_with_repeated_rows() -> None:
    # not the block construction: one input maps twice to the same row (replica 0, then replica 1)
    rows = torch.tensor([[2, 0, 2], [2, 1, 0]])
    signs = torch.tensor([[1.0, -1.0, 1.0], [-0.5, 0.5, 0.5]])
    cols, vals = reference.sjlt_gather_index(rows, signs, 3)
    assert cols[:, 2].tolist() == [0, 2, 0] and vals[:, 2].tolist() == [1.0, 1.0, -0.5]
    assert cols[:, 0].tolist() == [1, 2, -1] and cols[:, 1].tolist() == [1, -1, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("steps", [None, 1, 5])
def test_ordered_reference_equals_index_add(dtype: torch.dtype, steps: int | None) -> None:
    """The deterministic gather and the CPU scatter are one map: equal up to summation-order rounding."""
    sjlt = _block_sjlt(2000, 48, 2, seed=1)
    g = torch.randn(6, 2000, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = reference.sjlt_project_gather(g, *sjlt.gather_index(), steps)
    want = reference.sjlt_project(g, sjlt.rows, sjlt.signs, sjlt.k)
    assert got.dtype == want.dtype == reference.accumulation_dtype(g)
    scale = float(want.abs().max())
    tol = (1e-12 if dtype == torch.float64 else 1e-5) * scale
    assert float((got - want).abs().max()) <= tol
    # with steps a split, the result is the parts added in order
    if steps is not None:
        cols, vals = sjlt.gather_index()
        parts = [
            reference.sjlt_project_gather(g, cols[i : i + steps], vals[i : i + steps])
            for i in range(0, cols.shape[0], steps)
        ]
        assert torch.equal(got, reference.sum_parts(torch.stack(parts)))


def test_sjlt_map_moves_with_its_compressor() -> None:
    comp = make_compressor(GraSSConfig(compressor="factgrass", proj_dim=16), "m", d_in=9, d_out=8, bias=True)
    index = comp.sjlt.gather_index()
    moved = comp.to("cpu")
    assert isinstance(moved.sjlt, SJLTMap) and moved.sjlt.gather_index()[0].device.type == "cpu"
    assert torch.equal(moved.sjlt.gather_index()[0], index[0]) and torch.equal(
        moved.sjlt.rows, comp.sjlt.rows
    )
    with pytest.raises(ValueError, match=r"\[s, n\]"):
        SJLTMap(torch.zeros(3, dtype=torch.int64), torch.zeros(3), 4)


# SHA-256 (first 16 hex digits) of CPU outputs, computed with the code as it was before the inverse
# index and the deterministic kernels existed (commit cd16d9f): caches on disk were written with that
# CPU path, so it must not change by one bit. The inputs come from integer arithmetic and one
# correctly rounded division, and the only float sums are index_add_'s (fixed order) or exact ones
# (small integers in the masked outer product), so the hashes do not depend on the CPU or BLAS.
CPU_GOLDEN = {
    "sjlt/s1/compress_gradient": "5619c896d6a7ce54",
    "sjlt/s4/compress_gradient": "30ef584e049b4f46",
    "grass/s2/compress_gradient": "5483b1e62257a270",
    "factgrass/s1/compress_gradient": "01098b3f8233a3b5",
    "factgrass/s1/project_factor": "cfe82c2ec729c4c9",
    "factgrass/s1/compress": "67ee662605fb0221",
    "factgrass/s2/compress_gradient": "1c901abad963df66",
    "factgrass/s2/project_factor": "997c87a08c18409f",
    "factgrass/s2/compress": "1a10a355996288a4",
}


def _exact_floats(shape: tuple[int, ...], salt: int) -> torch.Tensor:
    i = torch.arange(math.prod(shape), dtype=torch.int64)
    v = ((i * 2654435761 + salt * 40503) % 2001 - 1000).to(torch.float64) / 37.0
    return v.to(torch.float32).reshape(shape)


def test_cpu_path_is_bit_identical_to_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_GRASS_KERNELS", raising=False)
    got = {}
    for name, k, nnz in (
        ("sjlt", 64, 1),
        ("sjlt", 64, 4),
        ("grass", 32, 2),
        ("factgrass", 64, 1),
        ("factgrass", 64, 2),
    ):
        config = GraSSConfig(compressor=name, proj_dim=k, sjlt_nnz=nnz, seed=7)
        comp = make_compressor(config, "h.0.mlp", d_in=41, d_out=30, bias=True)
        outs = {"compress_gradient": comp.compress_gradient(_exact_floats((3, 30, 41), 1))}
        if comp.factorised:
            outs["project_factor"] = comp.project_factor(_exact_floats((3, comp.m_out, comp.m_in), 2))
            x = _exact_floats((3, 9, 40), 3).mul(37).remainder(7).sub(3)
            delta = _exact_floats((3, 9, 30), 4).mul(37).remainder(5).sub(2)
            outs["compress"] = comp.compress(x, delta)
        for what, out in outs.items():
            got[f"{name}/s{nnz}/{what}"] = hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()[:16]
    assert got == CPU_GOLDEN
