"""A cross-library oracle: hf_grass without compression against kronfluence's EK-FAC (issue 17, item 6).

A tiny GPT-2 (built from ``GPT2Config``, trained a few steps on a toy corpus drawn from a seeded
bigram chain) is attributed three ways, with every convention aligned:

- **hf_grass**, the public path (``run_attribution_pass`` + ``Attributor.attribute``), configured so
  that nothing is compressed: the global layout with ``factor_dim`` >= every module width, so the
  factor spaces fit ``total_dim`` together and are stored as they are (``GradientComputer.embedded``)
  and the eigen masks keep every eigen-direction; float32 rows; the warm-up eigenbasis fitted on all
  the data (``ekfac_sample_size`` and ``warmup_tokens`` above it);
- **kronfluence** 1.0.1: EK-FAC on the *empirical* Fisher (``use_empirical_fisher=True``: hf_grass
  uses the per-example gradients of the actual loss), summed token loss, the same modules (every
  Conv1D as an equal ``nn.Linear``, and ``lm_head``), biases as a trailing input column in both,
  and the damping aligned: hf_grass's ``damping`` is a fraction of each module's mean corrected
  eigenvalue, which is kronfluence's heuristic (``damping_factor=None``, 0.1 x the mean) with its
  scale set to the same fraction;
- **brute force** in float64 (``_oracle_reference``): per-example gradients by batch-of-one autograd,
  covariances, ``eigh``, corrected eigenvalues and the explicit EK-FAC inverse.

Reported per query: Spearman, Pearson and the max relative error of every pair; the target is
Spearman >= 0.99 between hf_grass and kronfluence. ``--diagnose`` also compares each step (per-example
gradients, covariance spectra, corrected eigenvalues, damping, per-module scores) against the
brute force, to say which convention differs when the scores do not agree.

    python -m benchmarks.kronfluence_oracle                     # damping 0.1 and 0.001
    python -m benchmarks.kronfluence_oracle --diagnose --json-out oracle.json
    python -m benchmarks.kronfluence_oracle --smoke    # tiny sizes, seconds (CI: without kronfluence)

``--smoke`` checks that every step runs (its numbers mean nothing beyond hf_grass matching the brute
force); without kronfluence installed it compares hf_grass with the brute force only and reports
kronfluence under ``"skipped"``. A full run needs kronfluence.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from benchmarks import _bench_dev as bd
from benchmarks import _oracle_reference as ref
from benchmarks._common import cpu_name, emit_report, parse_with_smoke
from hf_grass.attribution import run_attribution_pass
from hf_grass.capture.engine import GradientComputer
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.query import Attributor

VOCAB = 48
# --smoke: every step (the diagnosis too) on 12 sequences; kronfluence's parts only where it is installed
SMOKE = {"train": 12, "queries": 3, "steps": 20, "dampings": [0.1], "diagnose": True}


def toy_corpus(n: int, seed: int, lo: int = 6, hi: int = 20) -> list[list[int]]:
    """Sequences from a seeded sparse bigram chain (each token has a few likely successors), so a few
    training steps lower the loss and the gradients have structure."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, VOCAB, generator=gen) * 3.0
    probs = torch.softmax(logits, -1)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        seq = [int(torch.randint(1, VOCAB, (1,), generator=gen))]
        for _ in range(length - 1):
            seq.append(int(torch.multinomial(probs[seq[-1]], 1, generator=gen)))
        out.append(seq)
    return out


def tiny_model(seed: int, corpus: list[list[int]], steps: int) -> torch.nn.Module:
    """GPT-2, 2 layers, width 32, untied ``lm_head``, trained ``steps`` Adam steps on ``corpus``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                        tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(corpus), (16,), generator=gen).tolist()
        batch = collate([{"input_ids": corpus[i]} for i in pick], 0)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def make_queries(seed: int, n: int) -> list[dict[str, list[int]]]:
    """Queries from the same chain: loss on the last 3 tokens only (a prompt and its completion)."""
    out = []
    for seq in toy_corpus(n, seed + 1000, lo=8, hi=14):
        out.append({"input_ids": seq, "labels": [-100] * (len(seq) - 3) + seq[-3:]})
    return out


def oracle_config(model: torch.nn.Module, damping: float, n_tokens: int, cache_dir: str) -> GraSSConfig:
    """hf_grass without compression: embedded factor spaces, every eigen-direction, float32 rows,
    the warm-up on all the data."""
    probe = GraSSConfig(total_dim=1, factor_dim=1)
    targets = GradientComputer(model, probe).targets
    factor_dim = max(max(t.d_in, t.d_out) for t in targets)
    total = sum(min(t.d_in, factor_dim) * min(t.d_out, factor_dim) for t in targets)
    return GraSSConfig(total_dim=total, factor_dim=factor_dim, dtype="float32", damping=damping,
                       ekfac_sample_size=10**9, warmup_tokens=n_tokens + 1, cache_dir=cache_dir, batch_size=8)  # fmt: skip


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Per query (row): Spearman, Pearson, max |a - b| / max |b|; min / mean over queries."""
    sp, pe, rel = [], [], []
    for x, y in zip(a.double().numpy(), b.double().numpy()):
        sp.append(stats.spearmanr(x, y).statistic)
        pe.append(stats.pearsonr(x, y).statistic)
        rel.append(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-300)))
    return {"spearman_min": float(np.min(sp)), "spearman_mean": float(np.mean(sp)),
            "pearson_min": float(np.min(pe)), "max_rel_err": float(np.max(rel))}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    corpus = toy_corpus(args.train, args.seed)
    model = tiny_model(args.seed, corpus, args.steps)
    train = [{"input_ids": s} for s in corpus]
    queries = make_queries(args.seed, args.queries)
    n_tokens = sum(len(s) for s in corpus)
    modules = [t.name for t in GradientComputer(model, GraSSConfig(total_dim=1, factor_dim=1)).targets]
    report: dict[str, Any] = {"settings": {**vars(args), "json_out": None, "modules": modules, "tokens": n_tokens,
                                           "cpu": cpu_name(), "torch": torch.__version__}, "dampings": {}}  # fmt: skip
    brute_parts = ref.reference_parts(model, train, queries, modules)
    for damping in args.dampings:
        with tempfile.TemporaryDirectory(prefix="oracle_") as tmp:
            config = oracle_config(model, damping, n_tokens, str(Path(tmp) / "cache"))
            start = time.perf_counter()
            with float64_eigenbasis(args.eigh_float64):
                cache = run_attribution_pass(model, train, config, disable_progress=True)
            if not GradientComputer(model, config).embedded:
                raise RuntimeError("the oracle configuration did not take the embedded (uncompressed) path")
            grass = Attributor(model, None, cache).attribute(queries)
            grass_s = time.perf_counter() - start
            brute = ref.ekfac_scores(brute_parts, damping)
            entry: dict[str, Any] = {"hf_grass_vs_brute_force": compare(grass, brute),
                                     "seconds": {"hf_grass": grass_s}}  # fmt: skip
            if args.kronfluence:
                start = time.perf_counter()
                kron = kronfluence_scores(model, train, queries, modules, damping, str(Path(tmp) / "kronfluence"))
                entry["seconds"]["kronfluence"] = time.perf_counter() - start
                torch.manual_seed(args.seed)  # the true Fisher draws labels from the model
                true_fisher = kronfluence_scores(model, train, queries, modules, damping, str(Path(tmp) / "kf_true"),
                                                 empirical=False)  # fmt: skip
                entry["hf_grass_vs_kronfluence"] = compare(grass, kron)
                # one convention left misaligned, to show what it alone changes
                entry["hf_grass_vs_kronfluence_true_fisher"] = compare(grass, true_fisher)
                entry["kronfluence_vs_brute_force"] = compare(kron, brute)
            if args.diagnose:
                entry["diagnosis"] = ref.diagnose(brute_parts, cache, Path(tmp) / "kronfluence", damping)
            report["dampings"][str(damping)] = entry
        for pair, row in entry.items():
            if "spearman_min" in row:
                print(f"damping {damping}: {pair}: Spearman min {row['spearman_min']:.4f} "
                      f"mean {row['spearman_mean']:.4f}, Pearson min {row['pearson_min']:.4f}, "
                      f"max rel err {row['max_rel_err']:.2e}", flush=True)  # fmt: skip
    return report


def kronfluence_scores(model: torch.nn.Module, train: list[dict[str, Any]], queries: list[dict[str, Any]],
                       modules: list[str], damping: float, folder: str, empirical: bool = True) -> torch.Tensor:  # fmt: skip
    """kronfluence's EK-FAC on the empirical Fisher with hf_grass's relative damping: its heuristic
    damping (``damping_factor=None``) with the scale set to ``damping`` instead of 0.1."""
    import kronfluence.factor.config as factor_config

    settings = bd.KronfluenceSettings(
        dampings=(None,), empirical_fisher=empirical, tracked_modules=modules, batch_size=8, output_dir=folder,
        factor_args={"covariance_max_examples": None, "lambda_max_examples": None},
    )  # fmt: skip
    scale = factor_config.HEURISTIC_DAMPING_SCALE
    factor_config.HEURISTIC_DAMPING_SCALE = damping
    try:
        return bd.kronfluence_run(model, train, queries, lambda rows: collate(rows, 0), settings)[None]
    finally:
        factor_config.HEURISTIC_DAMPING_SCALE = scale


@contextlib.contextmanager
def float64_eigenbasis(enabled: bool) -> Iterator[None]:
    """Demonstration patch (``--eigh-float64``): the warm-up's eigendecompositions in float64 instead
    of float32 (the warm-up calls ``hf_grass.precondition.linalg.eigh_psd`` with ``torch.float32``),
    to measure what single precision costs the scores at small damping."""
    from hf_grass.precondition import linalg

    if not enabled:
        yield
        return
    original = linalg.eigh_psd

    def eigh64(
        mat: torch.Tensor, dtype: torch.dtype = torch.float64, keep_device: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return original(mat, torch.float64, keep_device)

    linalg.eigh_psd = eigh64  # type: ignore[assignment]
    try:
        yield
    finally:
        linalg.eigh_psd = original  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=64, help="training sequences")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--steps", type=int, default=150, help="Adam steps before attributing")
    p.add_argument("--dampings", type=float, nargs="+", default=[0.1, 0.001])
    p.add_argument("--diagnose", action="store_true", help="compare every step against the brute force")
    p.add_argument("--eigh-float64", action="store_true", help="patch hf_grass's warm-up eigh to float64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", type=Path, default=None)
    args = parse_with_smoke(p, argv, SMOKE)
    # kronfluence is a benchmark-only package (CI does not install it): --smoke then checks the rest
    args.kronfluence = importlib.util.find_spec("kronfluence") is not None
    if not args.kronfluence and not args.smoke:
        raise SystemExit("pip install kronfluence  (the oracle's other library; --smoke runs without it)")
    torch.set_num_threads(args.threads)
    report = run(args)
    report["skipped"] = {} if args.kronfluence else {"kronfluence": "not installed"}
    return emit_report(report, args.json_out)


if __name__ == "__main__":
    main()
