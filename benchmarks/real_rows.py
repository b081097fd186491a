"""Real gradient rows for the index benchmarks: a tiny GPT-2 trained on short generated documents,
then the library's own attribution pass over ``--docs`` of them into a gradient cache.

The documents are sentences from a few templates over word lists (people, cities, jobs, objects,
colours, numbers), so they share topics and words the way a corpus does; the tiny model is trained
on the first ``--train-docs`` of them for one epoch, which gives its gradients the structure of a
trained model (a random model's gradients are close to noise). The pass is
``hf_grass.attribution.run_attribution_pass`` with FactGraSS (``--proj-dim`` per module, EK-FAC,
fp16, ``lm_head`` left out; or, with ``--default-config``, the default ``GraSSConfig``: 31,744-wide int8
rows), so the rows are exactly what a user's cache holds: whitened K-FAC rows.
The queries are ``--queries`` other generated documents (not in the cache), turned into query
vectors by ``hf_grass.query.Attributor.query_vectors``: the preconditioned query gradients a
``find_influential`` call scores. They are saved in ``<out>/queries.safetensors`` beside the cache.

    python -m benchmarks.real_rows --out /tmp/rows1m --docs 1000000      # the full set
    python -m benchmarks.real_rows --out /tmp/rows20k --docs 20000       # a quick one
    python -m benchmarks.real_rows --out /tmp/rows-smoke --smoke         # 1024 rows of 256, for CI
    python -m benchmarks.real_rows --out /tmp/rows100k --docs 100000 --default-config   # 31,744-wide int8 rows

Resumable: the pass resumes from its last shard when run again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks._common import cpu_name, git_state, parse_with_smoke

PEOPLE = [f"person{i}" for i in range(400)]
CITIES = [f"city{i}" for i in range(300)]
JOBS = [f"job{i}" for i in range(120)]
THINGS = [f"thing{i}" for i in range(500)]
COLOURS = [f"colour{i}" for i in range(40)]
NUMBERS = [str(i) for i in range(100)]
TEMPLATES = [
    "{p} lives in {c} and works as a {j} .",
    "{p} bought a {k} {t} in {c} for {n} coins .",
    "the {t} of {p} is {k} and weighs {n} kilos .",
    "in {c} every {j} owns a {k} {t} .",
    "{p} met {q} in {c} near the {t} .",
    "{q} told {p} that the {t} costs {n} coins .",
    "the {j} from {c} painted the {t} {k} .",
    "{p} and {q} moved from {c} to {d} .",
]
WORDS = sorted(
    set(PEOPLE + CITIES + JOBS + THINGS + COLOURS + NUMBERS)
    | {w for t in TEMPLATES for w in t.split() if "{" not in w}
)


# --smoke: several shards (so prefixes of the cache exist) of 8 x 32 numbers; seconds
SMOKE = {"docs": 1024, "queries": 16, "train_docs": 256, "proj_dim": 32, "shard_size": 256}


def document(rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(
        p=rng.choice(PEOPLE),
        q=rng.choice(PEOPLE),
        c=rng.choice(CITIES),
        d=rng.choice(CITIES),
        j=rng.choice(JOBS),
        t=rng.choice(THINGS),
        k=rng.choice(COLOURS),
        n=rng.choice(NUMBERS),
    )


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [document(rng) for _ in range(n)]


def make_model_and_tokenizer(n_embd: int, n_layer: int):  # noqa: ANN201 - transformers types
    """The tiny GPT-2 (4 heads, 32 positions, seed 0) and a word-level tokenizer over ``WORDS``."""
    from hf_grass.testing import tiny_gpt2, word_tokenizer

    tokenizer = word_tokenizer(WORDS)
    return tiny_gpt2(len(tokenizer), n_layer, n_embd, n_head=4, n_positions=32), tokenizer


def train(model: torch.nn.Module, tokenizer, texts: list[str], batch: int = 64) -> float:  # noqa: ANN001
    """One epoch of AdamW over ``texts``; returns the last batch's loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(0.0)
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start : start + batch], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder: <out>/cache, <out>/queries...")
    parser.add_argument("--docs", type=int, default=1_000_000, help="cached documents (default 10^6)")
    parser.add_argument("--queries", type=int, default=1000, help="query documents (default 1000)")
    parser.add_argument("--train-docs", type=int, default=50_000, help="training documents (default 50k)")
    parser.add_argument("--proj-dim", type=int, default=128, help="per module (8 modules; default 128)")
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=4096, help="rows per cache shard (default 4096)")
    parser.add_argument(
        "--default-config",
        action="store_true",
        help="the library's default GraSSConfig (31,744-wide int8 rows, lm_head included) instead of "
        "--proj-dim per module in fp16",
    )
    args = parse_with_smoke(parser, argv, SMOKE)
    torch.set_num_threads(1)

    from hf_grass.attribution import run_attribution_pass
    from hf_grass.config import GraSSConfig
    from hf_grass.data import padded_batches
    from hf_grass.query import Attributor

    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = make_model_and_tokenizer(args.n_embd, args.n_layer)
    model_file = args.out / "model.pt"
    start = time.perf_counter()
    if model_file.exists():
        model.load_state_dict(torch.load(model_file, weights_only=True))
        model.eval()
        final_loss = None
    else:
        final_loss = train(model, tokenizer, corpus(args.train_docs, seed=1))
        torch.save(model.state_dict(), model_file)
    train_s = time.perf_counter() - start

    if args.default_config:  # what a user's cache holds by default: the global layout, int8
        config = GraSSConfig(shard_size=args.shard_size, batch_size=args.batch_size)
    else:
        config = GraSSConfig(
            compressor="factgrass",
            proj_dim=args.proj_dim,
            sparsify_factor=2,
            exclude_modules=["lm_head"],
            dtype="float16",
            shard_size=args.shard_size,
            batch_size=args.batch_size,
        )
    docs = corpus(args.docs, seed=2)
    start = time.perf_counter()
    cache = run_attribution_pass(
        model, docs, config, tokenizer, cache_dir=args.out / "cache", disable_progress=True
    )
    pass_s = time.perf_counter() - start

    start = time.perf_counter()
    attributor = Attributor(model, tokenizer, cache, disable_progress=True)
    from hf_grass.attribution import example_source

    source = example_source(corpus(args.queries, seed=3), tokenizer, cache.config, model)
    queries = attributor.query_vectors(padded_batches(source, tokenizer, args.batch_size)).rows
    save_file({"queries": queries.contiguous()}, str(args.out / "queries.safetensors"))
    query_s = time.perf_counter() - start
    tokens = sum(len(tokenizer(d)["input_ids"]) for d in docs[:10000]) * (len(docs) / min(len(docs), 10000))
    info = {
        "cpu": cpu_name(),
        "threads": 1,
        "docs": args.docs,
        "config": cache.config.to_dict(),
        "rows": cache.num_rows,
        "dim": cache.dim,
        "queries": int(queries.shape[0]),
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "params": sum(p.numel() for p in model.parameters())},
        "train_docs": args.train_docs,
        "train_s": train_s,
        "final_train_loss": final_loss,
        "pass_s": pass_s,
        "tokens_estimated": tokens,
        "pass_tokens_per_s": tokens / pass_s,
        "query_vectors_s": query_s,
        "cache_bytes": sum(p.stat().st_size for p in (args.out / "cache").rglob("*") if p.is_file()),
        "git": git_state(),
    }
    (args.out / "rows_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
