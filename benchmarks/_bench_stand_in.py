"""A stand-in for bench-dev's ``common`` module, for ``python -m benchmarks.quality --smoke`` where
bench-dev is absent (CI).

It has the loader API and the metrics ``benchmarks.quality`` uses (``load``, ``load_checkpoint``,
``lds``, ``recall_at_k``) over three tiny benchmarks of the same kinds, built here in a second:

- ``tinylm``: ``hf_grass.testing``'s planted-facts documents and an untrained tiny GPT-2, with
  random subsets and random "retrained" losses;
- ``fact_tracing``: the same documents, each fact's prompt with its answer as the completion, the
  document stating it as the source;
- ``digits_mlp``: a small MLP (bench-dev's ``forward(input, labels)`` signature) on random inputs.

Every step of the script runs on them; the numbers mean nothing.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hf_grass.data import IGNORE_INDEX, collate
from hf_grass.evaluation import lds as lds_of_queries
from hf_grass.testing import PAD_ID, planted_facts_corpus, tiny_gpt2, word_tokenizer

SUBSETS = 8


class TinyMLP(nn.Module):
    """bench-dev's ``DigitsMLP`` shape in small: ``forward(input, labels=None)`` returns a dict."""

    def __init__(self, d_in: int = 8, d_hidden: int = 16, n_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, n_classes)

    def forward(self, input: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.fc2(F.relu(self.fc1(input)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def _lm_row(ids: list[int], prompt_tokens: int = 0) -> dict[str, torch.Tensor]:
    """bench-dev's encoding: tensors, labels on every token after the prompt."""
    t = torch.tensor(ids, dtype=torch.long)
    labels = t.clone()
    labels[:prompt_tokens] = IGNORE_INDEX
    return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": labels}


def load(name: str) -> SimpleNamespace:
    """One stand-in benchmark, with the fields ``benchmarks.quality`` reads."""
    gen = torch.Generator().manual_seed(0)
    bench = SimpleNamespace(name=name, tokenizer=None, masks=None, losses=None, source=None, test_records=None)
    if name == "digits_mlp":
        torch.manual_seed(0)
        bench.model = TinyMLP().eval()
        x, y = torch.randn(24, 8, generator=gen), torch.randint(0, 3, (24,), generator=gen)
        rows = [{"input": x[i], "labels": y[i]} for i in range(24)]
        bench.train, bench.test = rows[:16], rows[16:]
        bench.collate = lambda ex: {k: torch.stack([e[k] for e in ex]) for k in ("input", "labels")}
    else:
        docs, facts = planted_facts_corpus(n_facts=4, n_filler=12)
        bench.tokenizer = word_tokenizer(docs)
        bench.model = tiny_gpt2(len(bench.tokenizer), n_layer=1, n_embd=16).eval()
        bench.train = [_lm_row(bench.tokenizer(d)["input_ids"]) for d in docs]
        bench.collate = lambda ex: collate(ex, PAD_ID)
        if name == "tinylm":
            bench.test = bench.train[:4]
        else:
            bench.test_records = [{"prompt": f["prompt"], "completion": " " + f["answer"]} for f in facts]
            bench.test = []
            for record in bench.test_records:
                prompt = bench.tokenizer(record["prompt"])["input_ids"]
                answer = bench.tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
                bench.test.append(_lm_row(prompt + answer, len(prompt)))
            bench.source = np.array([f["doc"] for f in facts])
    if name != "fact_tracing":
        bench.masks = (torch.rand(SUBSETS, len(bench.train), generator=gen) < 0.5).numpy()
        bench.losses = torch.rand(SUBSETS, len(bench.test), generator=gen).numpy()
    return bench


def load_checkpoint(bench: SimpleNamespace, k: int) -> Any:
    """The stand-in has no training checkpoints: the model itself."""
    return bench.model


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> float:
    """bench-dev's orientation: ``scores`` is ``[n_train, n_test]``."""
    return lds_of_queries(np.asarray(scores).T, masks, losses)


def recall_at_k(scores: np.ndarray, source: np.ndarray, k: int) -> float:
    """The share of queries whose source document is among the ``k`` best scores (ties pessimistic)."""
    scores = np.asarray(scores, dtype=np.float64)
    own = scores[np.asarray(source), np.arange(scores.shape[1])]
    rank = (scores >= own[None, :]).sum(0) - 1
    return float((rank < k).mean())
