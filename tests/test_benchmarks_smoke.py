"""Every script in ``benchmarks/`` runs: each in its ``--smoke`` mode (tiny sizes, seconds) as a
subprocess, as a user would run it, and its JSON report has the keys the docs and the figures read,
with finite numbers. The numbers themselves mean nothing at these sizes; this catches a script that
an API change broke (the LDS benchmark was broken that way before this test existed).

What CI lacks is stood in for: ``quality`` runs on ``benchmarks/_bench_stand_in.py``'s tiny
benchmarks instead of bench-dev (and without kronfluence), ``real_model`` on a tiny untrained Llama
instead of the SmolLM2 wheel (``tokens`` and ``real_llm`` too), ``index`` and ``batched`` on the rows of
``real_rows --smoke``; ``real_llm`` and ``kronfluence_oracle`` leave kronfluence out where it is not
installed.
``gpu_kernels`` needs CUDA: without it the script must say there is nothing to time and exit 0.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {p.stem for p in (REPO / "benchmarks").glob("*.py") if not p.stem.startswith("_")}
# gpu_suite's --dry-run runs in tests/test_gpu_suite.py
TESTED = {"attribution_pass", "batched", "compress", "coverage", "during_pass", "gpu_kernels", "gpu_suite", "index",
          "kronfluence_oracle", "lds", "quality", "query", "real_llm", "real_model", "real_rows", "refine", "selection",
          "tokens", "warmup_memory"}  # fmt: skip
# kronfluence is a benchmark-only package (CI does not install it): the scripts that compare against it
# then run without it and report it under "skipped"
KRONFLUENCE = importlib.util.find_spec("kronfluence") is not None


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # the timeout only stops a hung script; the runs take seconds
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, f"benchmarks.{name} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def smoke(name: str, tmp: Path, *args: str) -> dict[str, Any]:
    """Run ``benchmarks.<name> --smoke``; its JSON report, which must name the commit it ran at."""
    out = tmp / f"{name}.json"
    run_script(name, "--smoke", "--json-out", str(out), *args)
    report = json.loads(out.read_text())
    assert set(report["git"]) == {"commit", "dirty"}
    return report


def finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def test_every_benchmark_script_has_a_smoke_test() -> None:
    assert SCRIPTS == TESTED, f"add a smoke test for {sorted(SCRIPTS - TESTED)}"


def test_coverage(tmp_path: Path) -> None:
    report = smoke("coverage", tmp_path)
    for name, entry in report["models"].items():
        assert finite(entry["cost"], entry["with"]["cpu_s"], entry["without"]["bytes_per_document"]), name
        assert entry["with"]["coverage"].startswith("attributing ")
        # leaving the embedding or the experts out lowers the fraction; the tied embedding's use is one
        # of the lm_head weight's two uses, so the fraction stays and the line says "partly"
        if name == "llama-tied":
            assert "partly" in entry["without"]["coverage"]
        else:
            assert entry["with"]["fraction"] > entry["without"]["fraction"]


def test_compress(tmp_path: Path) -> None:
    report = smoke("compress", tmp_path)
    assert {b["compressor"] for b in report["blocks"]} >= {"factgrass", "factgrass-eigen", "logra", "sjlt"}
    assert all(finite(b["block_tokens_per_s"]) and b["block_tokens_per_s"] > 0 for b in report["blocks"])
    assert set(report["goal"]) == {"target", "k", "ratio", "met"}


def test_attribution_pass(tmp_path: Path) -> None:
    report = smoke("attribution_pass", tmp_path)
    kinds = {r["kind"] for r in report["results"]}
    assert kinds == {"full", "activation", "factgrass", "ekfac", "ekfac-warmup"}
    assert all(finite(r["median_s"], r["tokens_per_s"], r["x_full"], r["cpu_median_s"]) for r in report["results"])


def test_query(tmp_path: Path) -> None:
    report = smoke("query", tmp_path)
    variants = {m["variant"] for m in report["measurements"]}
    assert {"stream (library)", "stream (library, cold)", "numpy fp32 in RAM", "torch fp32 in RAM"} <= variants
    assert all(finite(m["median_s"], m["rows_per_s"], m["x_numpy_fp32"]) for m in report["measurements"])
    assert [r["rows"] for r in report["rss"]] == [1024, 2048]
    assert all(finite(r["scan_peak_increase_mb"]) for r in report["rss"])
    assert [g["n_query"] for g in report["goals"]] == [1, 4] and report["rss_goal"]["met"] in (True, False)


def test_during_pass(tmp_path: Path) -> None:
    report = smoke("during_pass", tmp_path)
    assert finite(report["median_wall_s"]["build"], report["median_wall_s"]["during"])
    assert finite(report["ratio_during_over_build"], report["max_relative_score_difference"])
    # the benchmark's own check: scoring during the pass gives the lists of querying the cache
    assert report["identical_top"] is True and report["identical_bottom"] is True


def test_selection(tmp_path: Path) -> None:
    report = smoke("selection", tmp_path)
    arms = {r["arm"]: r for r in report["results"]}
    assert set(arms) == {"hf_grass", "hf_grass cosine", "random", "topic filter (reference)"}
    for r in arms.values():
        assert finite(r["target_loss_mean"], r["target_loss_std"]) and r["runs"] == len(r["target_losses"])
        assert abs(sum(r["composition"].values()) - 1) < 1e-9
    assert set(report["gain_over_random"]) == set(arms) - {"random"}
    assert finite(report["untrained_target_loss"], report["selection_s"], *report["gain_over_random"].values())


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``real_rows --smoke``: the real rows ``index`` and ``batched`` measure, built once."""
    out = tmp_path_factory.mktemp("rows")
    run_script("real_rows", "--smoke", "--out", str(out))
    return out


def test_real_rows(rows_dir: Path) -> None:
    info = json.loads((rows_dir / "rows_info.json").read_text())
    assert info["rows"] == info["docs"] == 1024 and info["dim"] == 8 * 32 and info["queries"] == 16
    assert finite(info["pass_s"], info["pass_tokens_per_s"], info["final_train_loss"], info["cache_bytes"])
    assert set(info["git"]) == {"commit", "dirty"}
    assert (rows_dir / "queries.safetensors").is_file() and (rows_dir / "cache" / "manifest.json").is_file()


def test_index(rows_dir: Path, tmp_path: Path) -> None:
    report = smoke("index", tmp_path, "--rows-dir", str(rows_dir), "--work", str(tmp_path / "work"))
    assert all(finite(v) for v in report["diagnosis"].values())
    kinds = {k["kind"] for k in report["choice"]["kinds"]}
    assert kinds == {"flat", "ivfpq", "hnsw-sq8", "hnsw", "ivfpq (no shortlist)"}
    for section in ("choice", "real", "random"):
        for kind in report[section]["kinds"]:
            assert finite(kind["build_s"], kind["index_bytes"], kind["index_fraction_of_cache"])
            for row in kind["settings"]:
                assert 0 <= row["recall_top"] <= 1 and 0 <= row["recall_bottom"] <= 1
                assert finite(row["median_latency_ms"], row["x_faster_than_exact"])
    assert report["real_goals"] and report["random_goals"]


def test_batched(rows_dir: Path, tmp_path: Path) -> None:
    report = smoke("batched", tmp_path, "--rows-dir", str(rows_dir), "--work", str(tmp_path / "work"))
    assert report["settings"]["rows"] == 1024 and report["settings"]["n_query"] == 16
    assert finite(report["stream_x_mm"], *report["rows_per_s"].values())
    assert len(report["rss"]) == 2 and all(finite(r["increase_mb"], r["seconds"]) for r in report["rss"])


def test_warmup_memory(tmp_path: Path) -> None:
    report = smoke("warmup_memory", tmp_path)  # a tiny Llama whose MLP and vocabulary are hashed
    run = report["run"]
    assert run["sums_measured_over_predicted"] == 1.0  # the memory model counts the sums' bytes exactly
    basis, written = run["model"]["warmup"]["basis"], run["measured"]["eigenbasis_file"]
    assert basis <= written <= 1.05 * basis  # the eigenbasis file: the model's bytes and a header
    assert finite(run["host_increase_measured"], run["host_increase_predicted"], run["main_increase_measured"])
    dense, moe = {"Llama-3.1-8B", "SmolLM2-135M"}, {"OLMoE-1B-7B", "Mixtral-8x7B", "Qwen3-30B-A3B"}
    assert set(report["tables"]) == dense | moe
    assert all(finite(*report["tables"][n]["warmup"].values(), *report["tables"][n]["main"].values()) for n in dense)
    for name in moe:  # the experts' sums: pooled, then within the budget (WARMUP_MAX_BYTES)
        warm = report["tables"][name]["warmup"]
        assert warm["after"]["sums"] <= min(warm["pooled"]["sums"], 32e9) < warm["before"]["sums"]


def test_lds(tmp_path: Path) -> None:
    report = smoke("lds", tmp_path)
    cells = {(r["compressor"], r["preconditioner"]) for r in report["results"]}
    assert cells == {(c, p) for c in ("factgrass", "logra") for p in ("ekfac", "kfac", "identity", "fim")}
    assert all(finite(r["lds"], r["cache_s"], r["score_s"]) for r in report["results"])
    assert finite(report["reference"]["planted_fact_docs_lds"], report["reference"]["seed_agreement"])
    assert finite(report["setup"]["full_model_query_loss"], report["setup"]["subset_query_loss"])


def test_quality(tmp_path: Path) -> None:
    report = smoke("quality", tmp_path)  # bench-dev's stand-ins; no kronfluence
    rows = {r["bench"]: r for r in report["results"]}
    assert set(rows) == {"tinylm", "fact_tracing", "digits_mlp"}
    assert set(rows["fact_tracing"]["metrics"]) == {
        "recall@1", "recall@10", "find_influential recall@1", "find_influential recall@10"
    }  # fmt: skip
    assert all(finite(*r["metrics"].values(), r["bytes_per_document"], r["pass_s"]) for r in rows.values())


def test_refine(tmp_path: Path) -> None:
    report = smoke("refine", tmp_path)  # bench-dev's stand-ins
    assert set(report["benches"]) == {"tinylm", "fact_tracing", "digits_mlp"}
    for r in report["benches"].values():
        assert finite(*r["curvature_ratio"], *r["effective_dimension_rows"].values())
        assert set(r["steps"]) == {"0", "1", "2"}
        assert all(finite(s["relative_residual"], s["cosine_to_ekfac"]) for s in r["steps"].values())
        # 0 steps is EK-FAC's answer itself
        assert abs(r["steps"]["0"]["cosine_to_ekfac"] - 1) < 1e-9
        assert r["damping_for_one_row"] is None or r["damping_for_one_row"] > 0


def test_real_model(tmp_path: Path) -> None:
    report = smoke("real_model", tmp_path)  # a tiny untrained Llama in place of SmolLM2
    assert finite(report["cache"]["bytes_per_document"], report["cache"]["tokens_per_s"])
    assert finite(report["speed"]["ratio"], report["speed"]["warmup_s"], report["speed"]["after_warmup_ratio"])
    assert set(report["facts"]) == {"queries", "exact", "bm25", "index+bm25", "bm25 alone"}
    assert all(0 <= report["facts"][s]["recall@1"] <= 1 for s in ("exact", "bm25", "index+bm25", "bm25 alone"))


def test_tokens(tmp_path: Path) -> None:
    report = smoke("tokens", tmp_path, "--html", str(tmp_path / "report.html"))  # a tiny untrained Llama
    assert set(report["median_wall_s"]) == {"query_gradient", "plain", "tokens", "rerun_forward_backward",
                                            "rerun_activation_backward"}
    assert finite(report["ratio_to_query_gradient"], report["ratio_to_rerun_forward_backward"],
                  report["ratio_to_rerun_activation_backward"], *report["accuracy"].values())
    assert report["accuracy"]["document_sum_rel_error"] < 1e-4 and report["accuracy"]["query_sum_rel_error"] < 1e-4
    assert report["rerun"]["documents"] >= 1 and (tmp_path / "report.html").is_file()


def check_ranking(m: dict[str, Any], questions: int, documents: int) -> None:
    """A method's recall and source ranks (``real_llm.ranking_metrics``) agree with each other."""
    ranks = m["source ranks"]
    assert len(ranks) == questions and all(isinstance(r, int) and 0 <= r < documents for r in ranks)
    assert m["recall@1"] == sum(r < 1 for r in ranks) / questions
    assert m["recall@10"] == sum(r < 10 for r in ranks) / questions
    assert 0 <= m["recall@1"] <= m["recall@10"] <= 1
    assert 1 <= m["distinct top1"] <= questions
    assert finite(*m["seconds"].values())


def test_real_llm(tmp_path: Path) -> None:
    report = smoke("real_llm", tmp_path)  # both parts, a tiny untrained Llama fine-tuned for one epoch
    assert report["model"] == "tiny untrained Llama (smoke)"
    requested = set(report["settings"]["methods"])
    assert {"default", "per-module", "identity", "bm25-q", "bm25-qa", "kronfluence"} <= requested
    kron = {n for n in requested if n.startswith("kronfluence")}
    assert set(report["skipped"]) == (set() if KRONFLUENCE else kron)
    ran = requested - set(report["skipped"])
    # the fine-tuned weights went to a folder of the run's own, removed with it (never /work/cache)
    cache_root = report["settings"]["cache_root"]
    assert not cache_root.startswith("/work/cache") and not Path(cache_root).exists()

    pre = report["pretrained"]
    assert set(pre["methods"]) == ran and len(pre["questions"]) == pre["settings"]["questions"] == 2
    for m in pre["methods"].values():
        check_ranking(m, 2, pre["settings"]["documents"])

    facts = report["facts"]
    # trained in this run, not loaded from an earlier one
    assert facts["training"]["cached"] is None and finite(facts["training"]["train_loss"])
    # per fact its source, sibling, decoy and practice document; then the docstrings
    assert facts["settings"]["documents"] == 4 * 2 + 3
    accuracy = facts["accuracy"]
    assert 0 <= accuracy["greedy"] <= 1 and 0 <= accuracy["answer_rank1"] <= 1
    assert len(accuracy["per_question"]) == 2
    assert set(facts["methods"]) == ran
    for name, m in facts["methods"].items():
        check_ranking(m, 2, facts["settings"]["documents"])
        assert sum(m["top1 kinds"].values()) == 2
        assert set(m["top1 kinds"]) <= {"source", "sibling", "decoy", "practice", "docstring"}
        for learned in ("recall@1 learned", "recall@10 learned"):  # None: the model answers none of them
            assert m[learned] is None or 0 <= m[learned] <= 1
        for side in ("helpful", "harmful"):
            n, mean, sign = m[f"patch {side} n"], m[f"patch {side} mean"], m[f"patch {side} expected sign"]
            assert 0 <= n <= 2
            assert ((mean, sign) == (None, None)) if n == 0 else (finite(mean) and 0 <= sign <= 1)
        if name.startswith("bm25"):  # a lexical ranking names no harmful document
            assert m["patch harmful n"] == 0


def test_kronfluence_oracle(tmp_path: Path) -> None:
    report = smoke("kronfluence_oracle", tmp_path)  # damping 0.1, with --diagnose
    assert report["skipped"] == ({} if KRONFLUENCE else {"kronfluence": "not installed"})
    (entry,) = report["dampings"].values()
    # hf_grass without compression (float32 rows, float32 warm-up eigh) against the float64 brute-force
    # EK-FAC: the same scores up to single precision
    brute = entry["hf_grass_vs_brute_force"]
    assert brute["spearman_min"] > 0.99 and brute["pearson_min"] > 0.999 and brute["max_rel_err"] < 1e-2
    worst = entry["diagnosis"]["worst_over_modules"]
    assert worst["hf_grass mask scale - 1"] == 0  # every eigen-direction kept: nothing rescaled
    for step in ("hf_grass cov_in spectrum rel err", "hf_grass cov_out spectrum rel err",
                 "hf_grass corrected eigenvalues rel err (own basis)"):  # fmt: skip
        assert worst[step] < 1e-4, step
    shares = entry["diagnosis"]["brute_force_share_of_|score|_per_module"]
    assert set(shares) == set(report["settings"]["modules"]) and abs(sum(shares.values()) - 1) < 1e-9
    if not KRONFLUENCE:
        assert not any("kronfluence" in key for key in [*entry, *entry["seconds"], *worst])
        return
    for pair in ("hf_grass_vs_kronfluence", "kronfluence_vs_brute_force"):  # the conventions aligned
        assert entry[pair]["spearman_min"] > 0.99, pair
    assert finite(*entry["hf_grass_vs_kronfluence_true_fisher"].values(), *entry["seconds"].values())
    assert worst["kronfluence corrected eigenvalues rel err (own basis)"] < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: gpu_kernels times for real (a GPU check)")
def test_gpu_kernels_without_cuda_has_nothing_to_time() -> None:
    proc = run_script("gpu_kernels", "--quick")
    assert "CUDA is not available on this machine; nothing to benchmark" in proc.stdout
