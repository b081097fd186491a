"""``benchmarks/gpu_suite.py --dry-run``: the GPU check's code on tiny shapes on the CPU, so that the
one prepared GPU run cannot rot between GPU sessions. Every section must be in the JSON, with
numbers (the Triton section may only be skipped, with its reason, where CUDA is absent)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = (
    "environment",
    "kernels",
    "process_group",
    "padding",
    "llama_build",
    "llama_plain",
    "llama_compression",
    "llama_default_pass",
)


def numbers(value: Any) -> list[float]:
    """Every finite int/float inside a JSON value (booleans are not numbers here)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)] if math.isfinite(value) else []
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return []


def test_dry_run_writes_every_section_with_numbers(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert (tmp_path / "gpu_suite.md").read_text().startswith("## hf_grass GPU suite")
    assert "## hf_grass GPU suite" in done.stdout  # the table is printed last
    sections = report["sections"]
    assert set(SECTIONS) <= set(sections)
    for name in SECTIONS:
        entry = sections[name]
        if name == "kernels" and not torch.cuda.is_available():
            assert entry["status"] == "skipped" and "CUDA" in entry["reason"]
            continue
        assert entry["status"] == "ok", (name, entry.get("error"), entry.get("traceback"))
        assert numbers(entry["results"]), name

    summary = report["summary"]
    for key in (
        "plain_tokens_per_s",
        "default_pass_tokens_per_s",
        "default_pass_time_over_plain",
        "warmup_s",
    ):
        assert summary[key] > 0, key
    comp = sections["llama_compression"]["results"]
    assert set(comp["ratio_factgrass_over_logra"]) == {"16", "64"}
    assert all(
        comp["runs"][f"{c}_k{k}"]["tokens_per_s"] > 0 for c in ("factgrass", "logra") for k in (16, 64)
    )
    # the pass's hook points still exist (a refactor that renames them must update the suite)
    dp = sections["llama_default_pass"]["results"]
    assert {"AttributionPass.warmup", "BatchRunner.encoded"} <= set(dp["probe"]["instrumented"])
    assert dp["depth_choice"]["chosen_layers"] == 2 and dp["final"]["pass_layers"] == 2
    # the dry run's process group is gloo: collectives forced on, the same cache and scores
    gloo = sections["process_group"]["results"]["backends"]["gloo"]
    assert gloo["ok"] and gloo["collectives"]["ok"] and gloo["forced"]["rows_same_bits"]
    # float32 rows do not depend on the padding beyond rounding (bf16 is measured, not judged)
    padding = sections["padding"]["results"]["variants"]
    assert padding["fp32_eager"]["max_rel"] < 1e-4 and padding["fp32_sdpa"]["max_rel"] < 1e-4
    assert all("max_rel" in v for v in padding.values())
