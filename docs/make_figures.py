"""Figures of the documentation, regenerated from scratch (offline, CPU, ~20 s with one thread).

    python docs/make_figures.py                                  # docs/img/planted_facts.png
    python docs/make_figures.py --compress-json compress.json    # + docs/img/compressor_throughput.png

``planted_facts.png``: a tiny GPT-2 is trained until it recites 12 made-up facts hidden in 60
documents (``hf_grass.testing``'s planted-facts corpus and tiny GPT-2, as in ``tests/test_trainer.py``),
a FactGraSS cache of its training set is built with ``AttributionTrainer``, and every fact's prompt
is attributed with its answer as the completion. Left: the scores of all 60 training documents for
one fact, the document that states it marked. Right: the rank of the stating document for each fact,
at ``proj_dim=1024`` and ``proj_dim=256``.

``compressor_throughput.png`` plots the block throughput of a JSON report written by
``python -m benchmarks.compress --json-out compress.json``; nothing is plotted that was not measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_grass import AttributionTrainer, GraSSConfig  # noqa: E402
from hf_grass.data import collate  # noqa: E402
from hf_grass.testing import NO_DROPOUT, planted_facts_corpus, tiny_gpt2, word_tokenizer  # noqa: E402

IMG = Path(__file__).resolve().parent / "img"


def planted_facts_scores(workdir: Path) -> dict:
    """Train the tiny model, build caches at proj_dim 1024 and 256, score every fact's query."""
    torch.set_num_threads(1)  # as in CI (OMP_NUM_THREADS=1): the trained weights depend on it
    docs, facts = planted_facts_corpus(n_filler=48)
    tokenizer = word_tokenizer(docs)
    model = tiny_gpt2(len(tokenizer), n_embd=64, **NO_DROPOUT)
    train = Dataset.from_dict({"text": docs}).map(lambda b: tokenizer(b["text"]), batched=True)
    args = TrainingArguments(
        output_dir=str(workdir / "out"), num_train_epochs=60, per_device_train_batch_size=16,
        learning_rate=3e-3, lr_scheduler_type="constant", report_to=[], disable_tqdm=True,
        save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
    )  # fmt: skip

    # a query: the prompt, then the answer; the loss covers the answer tokens only
    rows = []
    for fact in facts:
        prompt = tokenizer(fact["prompt"])["input_ids"]
        answer = tokenizer(" " + fact["answer"], add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    queries = Dataset.from_list(rows)

    scores = {}
    trainer = None
    for proj_dim in (1024, 256):
        config = GraSSConfig(
            compressor="factgrass", proj_dim=proj_dim, cache_dir=str(workdir / f"cache{proj_dim}")
        )
        if trainer is None:
            trainer = AttributionTrainer(
                model=model, args=args, train_dataset=train, processing_class=tokenizer,
                data_collator=functools.partial(collate, pad_token_id=tokenizer.pad_token_id), grass_config=config,
            )  # fmt: skip
            trainer.train()
        else:
            trainer.grass_config, trainer.gradient_cache = config, None
        trainer.build_gradient_cache()
        scores[proj_dim] = trainer.attribute(queries)  # [n_facts, n_docs], positive = helpful
    return {"docs": docs, "facts": facts, "scores": scores}


def rank_of(row: torch.Tensor, index: int) -> int:
    """1-based rank of ``row[index]`` among the scores, highest first."""
    return int((row > row[index]).sum()) + 1


def plot_planted_facts(data: dict, out: Path, fact_id: int = 0) -> None:
    facts, docs, scores = data["facts"], data["docs"], data["scores"]
    fact = facts[fact_id]
    row = scores[1024][fact_id]
    order = row.argsort(descending=True)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.9), gridspec_kw={"width_ratios": [1.55, 1]})

    colours = [
        "#d62728" if int(i) == fact["doc"] else ("#1f77b4" if row[i] >= 0 else "#9ecae1") for i in order
    ]
    ax.bar(range(len(order)), row[order].numpy(), color=colours, width=0.8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("training documents, sorted by score")
    ax.set_ylabel("influence score (positive = helpful)")
    ax.set_title(f'query: "{fact["prompt"]}"  ->  "{fact["answer"]}"', fontsize=10)
    top = float(row[fact["doc"]])
    text = docs[fact["doc"]]
    ax.annotate(
        f'planted source (doc {fact["doc"]}):\n"{text}"',
        xy=(0, top), xytext=(len(order) * 0.12, top * 0.72), fontsize=8,
        arrowprops={"arrowstyle": "->", "lw": 0.8},
    )  # fmt: skip
    ax.set_xticks([])
    ax.margins(x=0.01)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#d62728", "#1f77b4", "#9ecae1")]
    ax.legend(handles, ["document stating the fact", "helpful (> 0)", "harmful (< 0)"], fontsize=8,
              loc="lower left")  # fmt: skip

    worst = 1
    for proj_dim, marker, colour, dx in ((1024, "o", "#d62728", -0.12), (256, "s", "#7f7f7f", 0.12)):
        ranks = [rank_of(scores[proj_dim][i], f["doc"]) for i, f in enumerate(facts)]
        worst = max(worst, *ranks)
        hits = sum(r == 1 for r in ranks)
        bx.scatter([i + dx for i in range(len(facts))], ranks, marker=marker, color=colour,
                   label=f"proj_dim={proj_dim}: {hits}/{len(facts)} ranked first", s=28, zorder=3)  # fmt: skip
    top_rank = max(10, worst + 1)
    bx.set_ylim(top_rank + 0.5, 0.5)  # rank 1 at the top
    bx.set_yticks(range(1, top_rank + 1))
    bx.grid(axis="y", lw=0.4, alpha=0.5)
    bx.set_xticks(range(len(facts)))
    bx.set_xlabel("fact")
    bx.set_ylabel(f"rank of the planted source (of {len(docs)})")
    bx.set_title("FactGraSS + EK-FAC, tiny GPT-2 (64 wide)", fontsize=10)
    bx.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_compressor_throughput(report_path: Path, out: Path) -> None:
    """Block tokens/s per compressor and k, from a ``benchmarks.compress`` JSON report."""
    report = json.loads(report_path.read_text())
    settings = report["settings"]
    blocks = [b for b in report["blocks"] if b.get("block_tokens_per_s")]
    ks = sorted({b["k"] for b in blocks})
    names = [n for n in ("random", "fjlt", "sjlt", "mask", "grass", "logra", "factgrass")
             if any(b["compressor"] == n for b in blocks)]  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(ks)
    for j, k in enumerate(ks):
        values = [
            next((b["block_tokens_per_s"] for b in blocks if b["k"] == k and b["compressor"] == n), 0)
            for n in names
        ]
        ax.bar(
            [i + (j - (len(ks) - 1) / 2) * width for i in range(len(names))], values, width, label=f"k={k}"
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("tokens/s, one GPT-2 small block")
    ax.set_title(
        f"compress(x, delta), B={settings['batch']}, T={settings['seq']}, {settings['threads']} thread(s), "
        f"{settings['cpu']}, torch {settings['torch']}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--compress-json", type=Path, default=None, help="a benchmarks.compress --json-out report"
    )
    parser.add_argument("--skip-planted", action="store_true", help="do not retrain the planted-facts model")
    parser.add_argument(
        "--data", type=Path, default=None, help="reuse (or save) the planted-facts scores here"
    )
    opts = parser.parse_args()
    IMG.mkdir(exist_ok=True)
    hf_logging.set_verbosity_error()
    if not opts.skip_planted:
        if opts.data is not None and opts.data.is_file():
            data = torch.load(opts.data)
        else:
            with tempfile.TemporaryDirectory(prefix="hf_grass_figures_") as tmp:
                data = planted_facts_scores(Path(tmp))
            if opts.data is not None:
                torch.save(data, opts.data)
        plot_planted_facts(data, IMG / "planted_facts.png")
        for proj_dim, s in data["scores"].items():
            ranks = [rank_of(s[i], f["doc"]) for i, f in enumerate(data["facts"])]
            print(f"proj_dim={proj_dim}: planted source ranks {ranks}")
        print(f"wrote {IMG / 'planted_facts.png'}")
    if opts.compress_json is not None:
        plot_compressor_throughput(opts.compress_json, IMG / "compressor_throughput.png")
        print(f"wrote {IMG / 'compressor_throughput.png'}")


if __name__ == "__main__":
    main()
