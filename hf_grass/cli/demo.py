"""``hf-grass demo``: train a tiny model on the shipped corpus, cache its gradients, explain answers.

Offline and self-contained (well under two minutes on a 2-core CPU): a word-level tokenizer built
with ``tokenizers``, a 2-layer GPT-2 trained with ``AttributionTrainer`` on
``hf_grass/demo_data/demo_corpus.jsonl`` (invented cities with planted facts, two contradicting
documents, and filler), then ``find_influential`` for a few prompts with an explanation of what the
tables show.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_grass._version import __version__
from hf_grass.cli.common import (
    EXIT_OK,
    PROG,
    UsageError,
    check_output_file,
    dir_bytes,
    human_bytes,
    positive_int,
)
from hf_grass.cli.plots import matplotlib_classes, plot_scores
from hf_grass.config import GraSSConfig
from hf_grass.results import SCORE_LEGEND, format_result

if TYPE_CHECKING:
    from hf_grass.results import InfluenceResult


DEMO_CORPUS = "demo_data/demo_corpus.jsonl"
DEMO_FACTS = "demo_data/demo_facts.json"
_DEMO_MARKER = "hf_grass_demo.json"  # marks a directory the demo may overwrite
# Training recipe, measured on this corpus (2-layer, 64-wide GPT-2, 300 documents): 40 epochs
# recite 30/30 planted facts. Label smoothing keeps the model from becoming certain of what it
# memorised: at p=1 the gradient of a fact's loss vanishes and its document stops standing out
# (without it, 60 epochs put the fact's own document first for only 3 of the 30 facts).
DEMO_EPOCHS = 40
_DEMO_LABEL_SMOOTHING = 0.1
# The demo uses the library's default configuration (one row of GraSSConfig().resolved().total_dim int8 numbers
# per document, masks in the K-FAC eigenbasis, EK-FAC), so what it shows is what a user gets.


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off for the demo, restored afterwards (the demo
    prints its own lines; ``main`` may run inside a longer process, e.g. tests)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _demo_file(name: str) -> str:
    from importlib.resources import files

    return files("hf_grass").joinpath(name).read_text(encoding="utf-8")


def _prepare_demo_dir(path: Path) -> Path:
    """The output directory; an earlier demo's is reused, anything else non-empty is refused."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output-dir {str(path)!r} is a file")
    if path.is_dir() and any(path.iterdir()):
        if not (path / _DEMO_MARKER).is_file():
            raise UsageError(
                f"--output-dir {str(path)!r} exists and is not an earlier demo's directory; "
                "choose another (the demo overwrites what it writes there)"
            )
        for sub in ("model", "cache"):  # only what an earlier demo wrote
            shutil.rmtree(path / sub, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    (path / _DEMO_MARKER).write_text(json.dumps({"written_by": f"{PROG} demo", "version": __version__}))
    return path


class _Stages:
    """Prints numbered stages with their wall time."""

    def __init__(self, total: int):
        self.total, self.done, self.times = total, 0, []
        self.start = time.perf_counter()

    def run(self, title: str, fn: Callable[[], Any]) -> Any:
        self.done += 1
        print(f"[{self.done}/{self.total}] {title}", flush=True)
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.times.append((title.split(":")[0], dt))
        print(f"      ({dt:.1f} s)", flush=True)
        return out


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a tiny GPT-2 on a shipped corpus of a fictional world, cache its gradients, and show
    which documents taught it its answers. Offline; about a minute on a laptop CPU."""
    plot_path = check_output_file(args.plot, "--plot") if args.plot else None
    if plot_path is not None:
        matplotlib_classes()
    out = _prepare_demo_dir(Path(args.output_dir).expanduser())
    with _quiet_transformers():
        return _run_demo(args, out, plot_path)


def _run_demo(args: argparse.Namespace, out: Path, plot_path: Path | None) -> int:
    rows = [json.loads(line) for line in _demo_file(DEMO_CORPUS).splitlines() if line.strip()]
    facts = json.loads(_demo_file(DEMO_FACTS))["facts"]
    shown = [f for f in facts if f.get("show")]
    n_fact_docs = len({i for f in facts for i in f["documents"]})
    n_contra = len({i for f in facts for i in f.get("contradicted_by", [])})
    print(
        textwrap.dedent(f"""\
        hf-grass demo: which training documents made the model say this?

        The training set: {len(rows)} short documents about ten invented cities. {len(facts)} facts
        ("The river of Dunmarrow is the Lissel.") are each stated by one or two documents
        ({n_fact_docs} in all) and nowhere else; {n_contra} documents contradict a fact; the rest is
        everyday filler. A tiny GPT-2 learns the corpus, hf-grass caches a compressed gradient of
        every document, and for a prompt it ranks the documents by their influence on the model's
        answer. Output directory: {out}
        """)
    )
    stages = _Stages(5)

    def setup() -> tuple[Any, Any, Any]:
        from datasets import Dataset

        from hf_grass.testing import NO_DROPOUT, tiny_gpt2, word_tokenizer

        # one token per word or punctuation mark, so every invented name is one token and completions
        # are easy to read; [BOS] in front of every text, so a prompt sits where it did in training
        tokenizer = word_tokenizer([r["text"] for r in rows], punctuation=True, bos=True)
        model = tiny_gpt2(len(tokenizer), n_embd=64, n_head=4, **NO_DROPOUT)  # about 130k parameters
        ids = tokenizer([r["text"] for r in rows])["input_ids"]
        train = Dataset.from_list([{**r, "input_ids": i} for r, i in zip(rows, ids)])
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"      word-level tokenizer: {len(tokenizer)} tokens; GPT-2: 2 layers, {n_params:,} parameters"
        )
        return tokenizer, model, train

    tokenizer, model, train = stages.run("Setup: tokenizer, model and dataset (imports included)", setup)
    cache_dir = out / "cache"
    trainer = stages.run(
        f"Training: {args.epochs} epochs with transformers.Trainer (hf_grass.AttributionTrainer)",
        lambda: _demo_train(_demo_trainer(model, tokenizer, train, cache_dir, args.epochs)),
    )
    period = tokenizer.convert_tokens_to_ids(".")
    eos_ids = [tokenizer.eos_token_id, period]  # an answer ends with its sentence

    def answer(prompt: str) -> str:
        from hf_grass.query import generate

        ids = generate(
            model, tokenizer, tokenizer(prompt)["input_ids"], max_new_tokens=8, eos_token_id=eos_ids
        )
        return tokenizer.decode(ids, skip_special_tokens=True)

    def recall() -> dict[str, str]:
        said = {f["prompt"]: answer(f["prompt"]) for f in facts}
        right = sum(said[f["prompt"]].strip().rstrip(".").strip() == f["answer"] for f in facts)
        print(f"      the model completes {right} of the {len(facts)} planted facts correctly (greedy)")
        return said

    said = stages.run("Checking what the model learned", recall)

    def build() -> Any:
        model.config.name_or_path = str((out / "model").resolve())  # recorded in the cache manifest
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        cache = trainer.build_gradient_cache()
        s = cache.summary()
        print(
            f"      {s['rows']} rows x {s['dim']} numbers ({s['modules']} modules, factgrass), "
            f"{s['dtype']}, {human_bytes(dir_bytes(cache.path))} in {cache.path}"
        )
        return cache

    cache = stages.run("Gradient cache: one compressed gradient per training document", build)

    def explain() -> list[tuple[InfluenceResult, Any]]:
        from hf_grass.query import Attributor

        attributor = Attributor(model, tokenizer, cache)
        print("\n" + SCORE_LEGEND)
        panels = []
        for fact in shown:
            completion = said[fact["prompt"]]
            if not completion.strip():  # an undertrained model may stop at once
                print(f"\n(no answer to {fact['prompt']!r}; attributing the corpus's answer instead)")
                completion = f" {fact['answer']}."
            result = attributor.find_influential(
                fact["prompt"], k=args.k, completion=completion, all_scores=plot_path is not None
            )
            panels.append((result, result.scores))
            print("\n" + format_result(result))
            for line in _demo_verdict(fact, result, len(rows)):
                print(textwrap.fill(line, 100, initial_indent="  -> ", subsequent_indent="     "))
        return panels

    panels = stages.run("Attribution of the model's answers to a few prompts", explain)
    if plot_path is not None:
        plot_scores(plot_path, panels)
        print(f"\nScore distributions plotted to {plot_path}")
    print("\nTimings: " + ", ".join(f"{name} {dt:.1f} s" for name, dt in stages.times))
    print(f"Total: {time.perf_counter() - stages.start:.1f} s")
    example = next(f for f in facts if not f.get("show"))
    print(
        textwrap.dedent(f"""
        The model and tokenizer are in {out / "model"}, the gradient cache in {cache_dir}. Try:
          {PROG} info {cache_dir}
          {PROG} query --cache {cache_dir} --prompt "{example["prompt"]}" --max-new-tokens 3 -k 5
          {PROG} query --cache {cache_dir} --prompt "The founder of Veloria was" --max-new-tokens 3 --plot scores.png
        (answers here are a few words: a long generated completion mixes in filler text, whose
        documents then rank high too)""")
    )
    return EXIT_OK


def _demo_trainer(model: Any, tokenizer: Any, train: Any, cache_dir: Path, epochs: int) -> Any:
    import tempfile

    from transformers import (
        DataCollatorForLanguageModeling,
        PrinterCallback,
        ProgressCallback,
        TrainingArguments,
    )

    from hf_grass.trainer import AttributionTrainer

    steps_per_epoch = math.ceil(len(train) / 16)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_grass_demo_trainer_"),  # nothing is saved there
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        label_smoothing_factor=_DEMO_LABEL_SMOOTHING,
        logging_strategy="steps",
        logging_steps=max(1, (steps_per_epoch * epochs) // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=True,  # tiny model: the CPU is fast enough and the run is reproducible
        seed=0,
        disable_tqdm=True,
    )
    config = GraSSConfig(cache_dir=str(cache_dir), shard_size=128)
    trainer = AttributionTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        grass_config=config,
    )
    for callback in (PrinterCallback, ProgressCallback):  # replaced by one short line per quarter
        trainer.remove_callback(callback)
    trainer.add_callback(_demo_progress_callback())
    return trainer


def _demo_progress_callback() -> Any:
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                print(f"      step {state.global_step:>4}/{state.max_steps}  loss {float(logs['loss']):.3f}")

    return _Progress()


def _demo_train(trainer: Any) -> Any:
    try:
        trainer.train()
    finally:
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    return trainer


def _demo_verdict(fact: dict[str, Any], result: InfluenceResult, n_docs: int) -> list[str]:
    """What to notice in a demo table, read off the ranks (never assumed)."""
    answer = result.completion.strip().rstrip(".").strip()
    lines = []
    if answer != fact["answer"]:
        lines.append(f"The model answered {answer!r}; the corpus says {fact['answer']!r}.")
    helpful = {d.index: r for r, d in enumerate(result.documents, 1)}
    ranks = [helpful.get(i) for i in fact["documents"]]
    one = len(ranks) == 1
    stated = "The document that states" if one else f"The {len(ranks)} documents that state"
    if all(ranks):
        where = " and ".join(f"#{r}" for r in sorted(r for r in ranks if r))
        lines.append(
            f"{stated} this fact {'ranks' if one else 'rank'} {where} of {n_docs}: "
            f"{'it' if one else 'they'} taught the model this answer."
        )
    else:
        lines.append(
            f"{stated} this fact {'is' if one else 'are'} not in the top {len(result.documents)} here."
        )
    for d in result.documents:
        if d.index not in fact["documents"] and d.text and fact["answer"] in d.text:
            lines.append(
                f"#{d.index} helps too: it also says {fact['answer']!r}, about another city, so training "
                "on it makes that answer likelier after a similar sentence."
            )
    harmful = {d.index: r for r, d in enumerate(result.harmful, 1)}
    contradictions = fact.get("contradicted_by", [])
    for i in contradictions:
        if i in harmful:
            lines.append(
                f"The document that contradicts it (#{i}) is harmful #{harmful[i]}: training on it more "
                "would make the model less sure of its answer."
            )
        else:
            lines.append(
                f"The document that contradicts it (#{i}) is not in the top {len(result.harmful)} harmful."
            )
    if not contradictions and result.harmful and result.documents and result.documents[0].score > 0:
        share = abs(result.harmful[0].score) / result.documents[0].score
        lines.append(
            f"Nothing in the corpus contradicts this fact: the harmful documents are filler whose pull "
            f"is weak (the strongest is {share:.0%} of the top helpful score)."
        )
    return lines


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this command's parser (its flags sit next to its code)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=fmt,
        help="train a tiny model on a shipped corpus and show the documents behind its answers (offline)",
        description="Train a tiny GPT-2 on a small shipped corpus about a fictional world, build its "
        "gradient cache, and show for a few prompts which training documents helped or hurt the "
        "model's answer. Runs offline in about a minute on a CPU.",
    )
    p.add_argument(
        "--output-dir",
        default="hf_grass_demo",
        help="where the trained model and its gradient cache are written (an earlier demo's directory "
        "is overwritten; any other non-empty directory is refused)",
    )
    p.add_argument("--plot", metavar="PATH", help="also save the score distributions as a PNG (matplotlib)")
    p.add_argument("-k", type=positive_int, default=3, help="documents shown per table")
    # a shorter training for tests; the recipe above is what makes the demo's point
    p.add_argument("--epochs", type=positive_int, default=DEMO_EPOCHS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)
