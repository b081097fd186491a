"""Models other than causal LMs, against per-example autograd with batch size 1.

A tabular MLP that takes an ``input`` column, `transformers` sequence classifiers (padded batches,
a ``label`` column) and a user's ``per_example_loss`` for a model whose output is neither: the
cached rows and the scores must equal the compressed brute-force gradients and their dot products.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    Trainer,
    TrainingArguments,
)

from hf_grass import AttributionTrainer, GraSSCallback, find_influential
from hf_grass.attribution import AttributionPass, Batching, example_source, run_attribution_pass
from hf_grass.cache import GradientCache
from hf_grass.cache.files import CacheError
from hf_grass.capture import GradientComputer, per_example_loss
from hf_grass.config import GraSSConfig
from hf_grass.query import Attributor
from hf_grass.testing import random_token_examples, tiny_gpt2, word_tokenizer

VOCAB = 40
RTOL = 1e-5


class TabularMLP(nn.Module):
    """Like bench-dev's DigitsMLP: ``forward(input, labels=None)`` -> ``{"logits", "loss"}``."""

    def __init__(self, d_in: int = 8, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, input: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.fc2(torch.tanh(self.fc1(input)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Scorer(nn.Module):
    """A model whose output is a bare ``[B]`` tensor: only a user's loss says what to attribute."""

    def __init__(self, d_in: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(input))).sum(dim=1)


def squared_error(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(input=batch["input"]) - batch["target"]).square()


def tripled_squared_error(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return 3 * squared_error(model, batch)


def doubled_cross_entropy(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return 2 * F.cross_entropy(model(input=batch["input"])["logits"], batch["labels"], reduction="none")


def doubled_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return 2 * per_example_loss(logits, batch["labels"], "sum", batch["attention_mask"])


def brute_rows(
    model: nn.Module,
    computer: GradientComputer,
    examples: list,
    loss_of: Callable[[nn.Module, dict], torch.Tensor],
) -> torch.Tensor:
    """``[n, dim]``: each example's gradient from its own batch of one, compressed module by module."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    rows = []
    for ex in examples:
        model.zero_grad(set_to_none=True)
        loss_of(model, ex).backward()
        parts = []
        for t in computer.targets:
            w = t.module.weight.grad
            g = w.T if t.transposed else w
            if t.bias:
                g = torch.cat([g, t.module.bias.grad[:, None]], dim=1)
            parts.append(computer.compressors[t.name].compress_gradient(g[None])[0])
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol * want.abs().max().item())


def tabular(n: int, seed: int, d_in: int = 8) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    # "source" is not a model input: it is left out, as the Trainer leaves out unused columns
    return [{"input": x[i].tolist(), "labels": int(y[i]), "source": f"row-{i}"} for i in range(n)]


def mlp_loss(model: nn.Module, ex: dict) -> torch.Tensor:
    logits = model(input=torch.tensor([ex["input"]], dtype=torch.float64))["logits"]
    return F.cross_entropy(logits, torch.tensor([ex["labels"]]), reduction="sum")


@pytest.mark.parametrize("compressor", ["factgrass", "random"])
def test_tabular_mlp_with_an_input_column_matches_autograd(tmp_path: Path, compressor: str) -> None:
    torch.manual_seed(0)
    model = TabularMLP().double()
    config = GraSSConfig(compressor=compressor, proj_dim=16, preconditioner="identity", dtype="float32",
                         shard_size=4, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    train, queries = tabular(9, seed=1), tabular(3, seed=2)
    cache = run_attribution_pass(model, train, config, batch_size=4, disable_progress=True)
    assert cache.num_rows == 9 and cache.indices.tolist() == list(range(9))
    assert all(d["text"] is None for d in cache.documents(list(range(9))).values())
    attributor = Attributor(model, None, cache)
    scores = attributor.attribute(queries)
    want_train = brute_rows(model, attributor.computer, train, mlp_loss)
    want_query = brute_rows(model, attributor.computer, queries, mlp_loss)
    close(cache.load(), want_train)
    close(scores, want_query @ want_train.T, rtol=1e-4)


def sequence_classifier(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":  # Conv1D layers
        cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32, num_labels=3,
                         pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    else:
        cfg = LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, num_labels=3,
                          pad_token_id=0)  # fmt: skip
    return AutoModelForSequenceClassification.from_config(cfg).double()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sequence_classifier_matches_autograd(tmp_path: Path, kind: str, side: str) -> None:
    model = sequence_classifier(kind)
    config = GraSSConfig(compressor="factgrass", proj_dim=16, preconditioner="identity", dtype="float32",
                         shard_size=5)  # fmt: skip
    # variable lengths (padded in each batch of 3) and the `label` column of HF classification sets
    train = [
        dict(ex, label=i % 3) for i, ex in enumerate(random_token_examples(7, VOCAB, lo=3, hi=10, seed=3))
    ]
    queries = [
        dict(ex, label=i % 3) for i, ex in enumerate(random_token_examples(2, VOCAB, lo=3, hi=10, seed=4))
    ]
    computer = GradientComputer(model, config)
    source = example_source(train, None, config, model)
    AttributionPass(
        computer, source, tmp_path / "c", Batching(3, padding_side=side, disable_progress=True)
    ).run()
    cache = GradientCache(tmp_path / "c", verify=True)

    def loss(m: nn.Module, ex: dict) -> torch.Tensor:
        logits = m(input_ids=torch.tensor([ex["input_ids"]])).logits
        return F.cross_entropy(logits, torch.tensor([ex["label"]]), reduction="sum")

    scores = Attributor(model, None, cache, batch_size=2).attribute(queries)
    want_train = brute_rows(model, computer, train, loss)
    close(cache.load(), want_train)
    close(scores, brute_rows(model, computer, queries, loss) @ want_train.T, rtol=1e-4)


def scorer_rows(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x, t = torch.randn(n, 5, generator=gen), torch.randn(n, generator=gen)
    return [{"input": x[i].tolist(), "target": float(t[i])} for i in range(n)]


def test_user_loss_from_attribution_trainer_matches_autograd(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Scorer().double()
    config = GraSSConfig(compressor="factgrass", proj_dim=16, preconditioner="identity", dtype="float32",
                         cache_dir=str(tmp_path / "cache"))  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True,
                             per_device_eval_batch_size=3)  # fmt: skip
    train, queries = scorer_rows(7, seed=5), scorer_rows(2, seed=6)
    trainer = AttributionTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                                 grass_config=config, per_example_loss=squared_error)  # fmt: skip
    cache = trainer.build_gradient_cache()
    assert cache.manifest["loss"].endswith("squared_error")
    scores = trainer.attribute(queries)

    def loss(m: nn.Module, ex: dict) -> torch.Tensor:
        return squared_error(
            m,
            {
                "input": torch.tensor([ex["input"]], dtype=torch.float64),
                "target": torch.tensor([ex["target"]]),
            },
        ).sum()

    computer = trainer._attributor().computer
    want_train = brute_rows(model, computer, train, loss)
    close(cache.load(), want_train)
    close(scores, brute_rows(model, computer, queries, loss) @ want_train.T, rtol=1e-4)
    # the query must take the gradient of the same loss
    with pytest.raises(ValueError, match="built with per_example_loss=.*squared_error"):
        Attributor(model, None, cache)
    with pytest.raises(CacheError, match="another per-example loss"):  # no resume with another loss
        run_attribution_pass(model, train, config, per_example_loss=tripled_squared_error)
    with pytest.raises(ValueError, match="one loss per example"):
        bad = lambda m, b: squared_error(m, b).mean()  # noqa: E731  a batch mean is not per example
        run_attribution_pass(
            model, train, config.replace(cache_dir=str(tmp_path / "bad")), per_example_loss=bad
        )


def test_user_loss_from_the_callback_and_find_influential(tmp_path: Path) -> None:
    """Scores of a loss twice the built-in one are 4x the built-in scores (identity preconditioner)."""
    torch.manual_seed(0)
    model = TabularMLP()  # float32: the Trainer's collator makes float32 features
    config = GraSSConfig(compressor="factgrass", proj_dim=16, preconditioner="identity", dtype="float32")
    train, queries = tabular(8, seed=7), tabular(2, seed=8)
    plain = run_attribution_pass(model, train, config.replace(cache_dir=str(tmp_path / "plain")),
                                 disable_progress=True)  # fmt: skip
    with pytest.raises(ValueError, match="built-in per-example loss"):
        Attributor(model, None, plain, per_example_loss=doubled_cross_entropy)
    callback = GraSSCallback(
        config.replace(cache_dir=str(tmp_path / "cb")), per_example_loss=doubled_cross_entropy
    )
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, learning_rate=0.0, weight_decay=0.0,
                             per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True,
                             logging_strategy="no", save_strategy="no")  # fmt: skip
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(train), callbacks=[callback]).train()
    assert callback.cache is not None and callback.cache.num_rows == 8
    close(callback.attribute(queries), 4 * Attributor(model, None, plain).attribute(queries), rtol=1e-4)

    # a causal LM through run_attribution_pass and the one-line find_influential
    words = [f"w{i}" for i in range(30)]
    tok = word_tokenizer(words)
    lm = tiny_gpt2(len(tok), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).double()
    docs = [" ".join(words[i : i + 5]) for i in range(0, 25, 3)]
    lm_config = config.replace(cache_dir=str(tmp_path / "lm"))
    builtin = run_attribution_pass(lm, docs, lm_config, tok, disable_progress=True)
    doubled = run_attribution_pass(lm, docs, lm_config.replace(cache_dir=str(tmp_path / "lm2")), tok,
                                   disable_progress=True, per_example_loss=doubled_lm_loss)  # fmt: skip
    ask = dict(model=lm, tokenizer=tok, k=2, completion="w3 w4", all_scores=True)
    want = find_influential("w0 w1 w2", cache=builtin, **ask).scores
    got = find_influential("w0 w1 w2", cache=doubled, per_example_loss=doubled_lm_loss, **ask).scores
    close(got, 4 * want, rtol=1e-4)


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([0, 2, 1]),
        torch.tensor([0.5, -1.0, 2.0]),
        torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0]]),
    ],
)
def test_head_losses_are_the_per_example_terms_of_the_transformers_loss(labels: torch.Tensor) -> None:
    """Single-label, regression (num_labels=1) and multi-label heads: the mean of our per-example
    losses is the loss the transformers head computes for the batch."""
    num_labels = 1 if labels.dim() == 1 and labels.is_floating_point() else 3
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32, num_labels=num_labels,
                     pad_token_id=0)  # fmt: skip
    model = AutoModelForSequenceClassification.from_config(cfg).double().eval()
    ids = torch.randint(4, VOCAB, (3, 6))
    out = model(input_ids=ids, labels=labels)
    reduction = "mean" if labels.dim() == 2 else "sum"  # multi-label: BCE averaged over the labels
    mine = per_example_loss(out.logits, labels, reduction)
    assert mine.shape == (3,)
    torch.testing.assert_close(mine.mean(), out.loss.double(), rtol=1e-6, atol=1e-7)
