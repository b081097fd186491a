"""Data selection with hf_grass (LESS-style): train on the selected N of a pool, against a random N.

Everything is built offline: a word-level tokenizer and a tiny Llama (from a config), and a
candidate pool of generated documents in six styles, one of them the target task:

- ``addition`` (the target task): "3 plus 4 is 7 . 9 plus 0 is 9 ." (correct sums of 0-9);
- ``noisy addition``: the same sentences with random answers (harmful for the task);
- ``multiplication``: "3 times 4 is 12 ." (same format and numbers, another table);
- ``counting``: runs of consecutive numbers ("5 6 7 8 9");
- ``people``: sentences about made-up people, cities and jobs;
- ``word lists``: lists of colours and objects.

The target set is a few held-out ``addition`` documents (``--targets``, the "dev" set the
selection sees); the target loss is the mean token loss on ``--test`` other held-out ``addition``
documents that nothing sees before the evaluation.

1. Warm-up (as LESS does): train the base model briefly on a random ``--warmup-fraction`` of the
   pool; build a gradient cache of that sample with it (the reference that fixes the compressors
   and the preconditioner: ``Attributor.score_dataset``).
2. Select: ``Attributor.score_dataset(pool, targets, select=N)``, the N documents with the highest
   mean score over the targets, with the default scores and with unit-normalised (cosine) ones.
3. Train the base model from its initialisation for the same number of steps on each selection and
   on ``--random-seeds`` random N-subsets of the pool, each with ``--train-seeds`` data orders, and
   record the target loss. The ``topic filter`` row is a reference that hf_grass does not have:
   a random N of the clean ``addition`` documents (all of them when there are fewer than N).

Run it::

    OMP_NUM_THREADS=1 python -m benchmarks.selection --json-out selection.json
    OMP_NUM_THREADS=1 python -m benchmarks.selection --smoke     # tiny sizes: checks that it runs
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import cpu_name, emit_report, parse_with_smoke

TARGET = "addition"
# share of each style in the pool (the target task is rare, as in a real corpus)
MIX = {
    "addition": 0.04,
    "noisy addition": 0.04,
    "multiplication": 0.12,
    "counting": 0.2,
    "people": 0.4,
    "word lists": 0.2,
}
PEOPLE = [f"person{i}" for i in range(60)]
CITIES = [f"city{i}" for i in range(30)]
JOBS = ["baker", "singer", "farmer", "sailor", "potter", "weaver", "trader", "miller"]
COLOURS = ["red", "blue", "green", "grey", "white", "black", "gold", "pink", "brown", "amber"]
THINGS = ["lamp", "rope", "boat", "coat", "bread", "apple", "net", "rug", "cup", "stone", "key", "bell"]
SMOKE = {"pool": 120, "targets": 4, "test": 8, "select": 16, "steps": 6, "warmup_steps": 3,
         "random_seeds": 2, "train_seeds": 1, "hidden": 16, "proj_dim": 64}  # fmt: skip


def sentence(style: str, rng: random.Random) -> str:
    a, b = rng.randrange(10), rng.randrange(10)
    if style == "addition":
        return f"{a} plus {b} is {a + b} ."
    if style == "noisy addition":
        return f"{a} plus {b} is {rng.randrange(19)} ."
    if style == "multiplication":
        return f"{a} times {b} is {a * b} ."
    if style == "counting":
        start = rng.randrange(80)
        return " ".join(str(start + i) for i in range(rng.randint(4, 8))) + " ."
    if style == "people":
        return f"{rng.choice(PEOPLE)} is a {rng.choice(JOBS)} in {rng.choice(CITIES)} ."
    if style == "word lists":
        return " ".join(f"{rng.choice(COLOURS)} {rng.choice(THINGS)}" for _ in range(rng.randint(2, 4))) + " ."
    raise ValueError(f"unknown style {style!r}")


def document(style: str, rng: random.Random) -> str:
    return " ".join(sentence(style, rng) for _ in range(rng.randint(2, 4)))


def make_pool(n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` documents in the ``MIX`` proportions, shuffled, and each one's style."""
    rng = random.Random(seed)
    styles = [s for s, share in MIX.items() for _ in range(max(1, round(share * n)))]
    rng.shuffle(styles)
    return [document(s, rng) for s in styles], styles


def make_model(vocab_size: int, hidden: int, seed: int) -> torch.nn.Module:
    from hf_grass.testing import tiny_llama

    return tiny_llama(vocab_size, seed=seed, hidden=hidden, layers=2)


def train(model: torch.nn.Module, tok: Any, texts: list[str], steps: int, seed: int, args: argparse.Namespace) -> None:
    """``steps`` AdamW steps over shuffled ``texts`` (epoch after epoch), linear decay of the rate."""
    gen = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(1, steps))
    order: list[int] = []
    model.train()
    for _ in range(steps):
        if len(order) < args.batch_size:
            order += gen.sample(range(len(texts)), len(texts))
        batch, order = order[: args.batch_size], order[args.batch_size :]
        enc = tok([texts[i] for i in batch], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def target_loss(model: torch.nn.Module, tok: Any, texts: list[str]) -> float:
    """Mean token loss over ``texts`` (every token, as the documents are trained)."""
    total, count = 0.0, 0
    for i in range(0, len(texts), 64):
        enc = tok(texts[i : i + 64], return_tensors="pt", padding=True)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1]
        labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        total, count = total + float(loss), count + int((labels != -100).sum())
    return total / count


def select_with_hf_grass(
    model: torch.nn.Module, tok: Any, pool: list[str], warm: list[int], targets: list[str], args: argparse.Namespace,
    workdir: Path,
) -> dict[str, list[int]]:  # fmt: skip
    """The N selected documents per scoring variant: a reference cache of the warm-up sample, then
    one scoring pass over the pool per variant (nothing stored)."""
    from hf_grass.attribution import run_attribution_pass
    from hf_grass.config import GraSSConfig
    from hf_grass.query import Attributor

    config = GraSSConfig(proj_dim=args.proj_dim, cache_dir=str(workdir / "reference"), seed=args.seed)
    cache = run_attribution_pass(model, [pool[i] for i in warm], config, tok, batch_size=32, disable_progress=True)
    out = {}
    for name, cosine in (("hf_grass", False), ("hf_grass cosine", True)):
        attributor = Attributor(model, tok, cache, cosine=cosine, batch_size=32, disable_progress=True)
        found = attributor.score_dataset(pool, targets, k=1, select=args.select, bottom=False)
        assert found.selected is not None
        out[name] = found.selected.indices[0].tolist()
    return out


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from hf_grass.testing import word_tokenizer

    pool, styles = make_pool(args.pool, args.seed)
    rng = random.Random(args.seed + 1)
    targets = [document(TARGET, rng) for _ in range(args.targets)]
    test = [document(TARGET, rng) for _ in range(args.test)]
    tok = word_tokenizer(pool + targets + test + [str(i) for i in range(100)])
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    # 1. warm-up on a random sample of the pool (LESS: 5%), from the base initialisation
    warm = sorted(random.Random(args.seed + 2).sample(range(len(pool)), max(2, int(args.warmup_fraction * len(pool)))))
    warm_model = make_model(len(tok), args.hidden, args.seed)
    warm_texts = [pool[i] for i in warm] + (targets if args.warmup_on_targets else [])
    train(warm_model, tok, warm_texts, args.warmup_steps, args.seed, args)
    # 2. selection
    t0 = time.perf_counter()
    arms: dict[str, list[list[int]]] = {
        name: [chosen] for name, chosen in select_with_hf_grass(warm_model, tok, pool, warm, targets, args, workdir).items()
    }  # fmt: skip
    select_s = time.perf_counter() - t0
    arms["random"] = [random.Random(1000 + s).sample(range(len(pool)), args.select) for s in range(args.random_seeds)]
    clean = [i for i, s in enumerate(styles) if s == TARGET]
    arms["topic filter (reference)"] = [
        random.Random(2000 + s).sample(clean, min(args.select, len(clean))) for s in range(args.random_seeds)
    ]
    # 3. train the base model on each subset, for the same number of steps
    base = make_model(len(tok), args.hidden, args.seed)
    base_loss = target_loss(base, tok, test)
    results = []
    for name, subsets in arms.items():
        losses = []
        for subset in subsets:
            for train_seed in range(args.train_seeds):
                model = make_model(len(tok), args.hidden, args.seed)
                train(model, tok, [pool[i] for i in subset], args.steps, 100 + train_seed, args)
                losses.append(target_loss(model, tok, test))
        composition = Counter(styles[i] for subset in subsets for i in subset)
        total = sum(composition.values())
        results.append({
            "arm": name,
            "subsets": len(subsets),
            "runs": len(losses),
            "target_loss_mean": statistics.fmean(losses),
            "target_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "target_losses": losses,
            "composition": {s: composition.get(s, 0) / total for s in MIX},
        })  # fmt: skip
    by_arm = {r["arm"]: r for r in results}
    random_mean = by_arm["random"]["target_loss_mean"]
    return {
        "benchmark": "selection",
        "setup": {
            "pool": len(pool), "mix": MIX, "targets": len(targets), "test": len(test), "select": args.select,
            "warmup_docs": len(warm), "warmup_steps": args.warmup_steps, "steps": args.steps,
            "warmup_on_targets": args.warmup_on_targets,
            "batch_size": args.batch_size, "lr": args.lr, "hidden": args.hidden, "proj_dim": args.proj_dim,
            "random_seeds": args.random_seeds, "train_seeds": args.train_seeds, "seed": args.seed,
            "model_parameters": sum(p.numel() for p in base.parameters()),
        },  # fmt: skip
        "untrained_target_loss": base_loss,
        "results": results,
        "gain_over_random": {r["arm"]: random_mean - r["target_loss_mean"] for r in results if r["arm"] != "random"},
        "selection_s": select_s,
        "total_s": time.perf_counter() - started,
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
    }


def print_table(out: dict[str, Any]) -> None:
    setup = out["setup"]
    print(f"pool {setup['pool']} documents, select {setup['select']}, {setup['steps']} training steps per run")
    styles = list(out["setup"]["mix"])
    print(f"{'arm':26s} {'runs':>4s} {'target loss':>12s} {'±std':>6s}  " + " ".join(f"{s[:8]:>8s}" for s in styles))
    for r in out["results"]:
        mix = " ".join(f"{r['composition'][s]:8.2f}" for s in styles)
        print(f"{r['arm']:26s} {r['runs']:4d} {r['target_loss_mean']:12.3f} {r['target_loss_std']:6.3f}  {mix}")
    print(f"(untrained model: {out['untrained_target_loss']:.3f}; columns after ±std: share of each style)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=int, default=3000, help="candidate documents")
    p.add_argument("--targets", type=int, default=16, help="target (dev) documents the selection sees")
    p.add_argument("--test", type=int, default=256, help="held-out target documents for the target loss")
    p.add_argument("--select", type=int, default=150, help="documents selected (N)")
    p.add_argument("--warmup-fraction", type=float, default=0.05, help="share of the pool the warm-up trains on")
    p.add_argument("--warmup-steps", type=int, default=60, help="optimizer steps of the warm-up")
    p.add_argument("--warmup-on-targets", action="store_true", help="the warm-up also trains on the targets")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of every training run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64, help="width of the tiny Llama (2 layers)")
    p.add_argument("--proj-dim", type=int, default=1024, help="GraSSConfig.proj_dim of the reference cache")
    p.add_argument("--random-seeds", type=int, default=3, help="random N-subsets (and topic-filter subsets)")
    p.add_argument("--train-seeds", type=int, default=3, help="data orders per training subset")
    p.add_argument("--seed", type=int, default=0, help="pool, initialisation and projections")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")
    return parse_with_smoke(p, argv, SMOKE)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = run(args, Path(tmp))
    print_table(out)
    return emit_report(out, args.json_out)


if __name__ == "__main__":
    main()
