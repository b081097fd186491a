"""Figures of the documentation, regenerated from scratch (offline, CPU, ~20 s with one thread).

    python docs/make_figures.py                                  # docs/img/planted_facts.png
    python docs/make_figures.py --compress-json compress.json    # + docs/img/compressor_throughput.png

``planted_facts.png``: a tiny GPT-2 is trained until it recites 12 made-up facts hidden in 60
documents (the setup of ``tests/test_trainer.py``, copied here so the docs do not import the tests),
a FactGraSS cache of its training set is built with ``AttributionTrainer``, and every fact's prompt
is attributed with its answer as the completion. Left: the scores of all 60 training documents for
one fact, the document that states it marked. Right: the rank of the stating document for each fact,
at ``proj_dim=1024`` and ``proj_dim=256``.

``compressor_throughput.png`` plots the block throughput of a JSON report written by
``python -m benchmarks.compress --json-out compress.json``; nothing is plotted that was not measured.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_grass import AttributionTrainer, GraSSConfig  # noqa: E402

IMG = Path(__file__).resolve().parent / "img"
SYLLABLES = [
    "ka",
    "zo",
    "ri",
    "mu",
    "tel",
    "vas",
    "quo",
    "ne",
    "bri",
    "lom",
    "sa",
    "dex",
    "fin",
    "gor",
    "pal",
    "wy",
]
FILLER = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "on",
    "for",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "it",
    "be",
    "are",
    "or",
    "an",
    "which",
    "river",
    "stone",
    "market",
    "winter",
    "garden",
    "light",
    "story",
    "music",
    "city",
    "road",
    "north",
    "south",
    "old",
    "new",
]


# ---- the planted-facts setup (as in tests/_models.py and tests/test_trainer.py) --------------------


def planted_facts_corpus(
    n_facts: int = 12, n_filler: int = 48, seed: int = 0
) -> tuple[list[str], list[dict]]:
    """Documents stating made-up facts ("the capital of X is Y") among filler text, shuffled.

    Returns the documents and, per fact, ``{"doc": index, "prompt": ..., "answer": ...}``.
    """
    rng = random.Random(seed)

    def name() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(3))

    relations = ["capital", "king", "river", "poet"]
    docs, facts = [], []
    for i in range(n_facts):
        subject, answer, rel = name(), name(), relations[i % len(relations)]
        filler = " ".join(rng.choice(FILLER) for _ in range(6))
        docs.append(f"the {rel} of {subject} is {answer} {filler}")
        facts.append({"prompt": f"the {rel} of {subject} is", "answer": answer})
    for _ in range(n_filler):
        docs.append(" ".join(rng.choice(FILLER) for _ in range(rng.randint(6, 14))))
    order = list(range(len(docs)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    for i, fact in enumerate(facts):
        fact["doc"] = where[i]
    return [docs[i] for i in order], facts


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words) - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def tiny_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=vocab_size, n_positions=64, tie_word_embeddings=False,
        bos_token_id=2, eos_token_id=3, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def planted_facts_scores(workdir: Path) -> dict:
    """Train the tiny model, build caches at proj_dim 1024 and 256, score every fact's query."""
    torch.set_num_threads(1)  # as in CI (OMP_NUM_THREADS=1): the trained weights depend on it
    docs, facts = planted_facts_corpus()
    tokenizer = word_tokenizer([w for d in docs for w in d.split()])
    model = tiny_gpt2(len(tokenizer))
    train = Dataset.from_dict({"text": docs}).map(lambda b: tokenizer(b["text"]), batched=True)
    args = TrainingArguments(
        output_dir=str(workdir / "out"), num_train_epochs=60, per_device_train_batch_size=16,
        learning_rate=3e-3, lr_scheduler_type="constant", report_to=[], disable_tqdm=True,
        save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
    )  # fmt: skip

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

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
                data_collator=collate, grass_config=config,
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
