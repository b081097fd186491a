"""The model side of the real-LLM suite: encoding, fine-tuning through ``AttributionTrainer.train()``
(weights cached on disk), the model's own accuracy on the facts, and TrackStar's tail-patch.

Encoding (as bench-dev's): a document is ``[<|endoftext|>] + tokens + [<|endoftext|>]`` with loss on
every token after the first; a query is ``[<|endoftext|>] + prompt + completion`` with loss on the
completion only. The pass records the documents' leading ``<|endoftext|>``, so ``find_influential``
encodes a text prompt the same way (checked by ``check_query_encoding``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_grass.capture.loss import per_example_loss
from hf_grass.config import GraSSConfig
from hf_grass.data import IGNORE_INDEX, collate

DOC_TOKEN = 0  # SmolLM2's <|endoftext|>, the separator of its pretraining documents


def encode_document(tokenizer: Any, text: str, max_tokens: int) -> dict[str, Any]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return {"input_ids": [DOC_TOKEN, *ids, DOC_TOKEN], "text": tokenizer.decode(ids)}


def encode_query(tokenizer: Any, prompt: str, completion: str) -> dict[str, list[int]]:
    prompt_ids = [DOC_TOKEN, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def check_query_encoding(model: Any, tokenizer: Any, cache: Any, prompt: str, completion: str) -> None:
    """The library's own query encoding must equal ours (kronfluence and the tail-patch use ours)."""
    from hf_grass.prompts import encode_query as library_encoding

    _, _, batch = library_encoding(model, tokenizer, prompt, completion, documents=cache)
    mine = encode_query(tokenizer, prompt, completion)
    if batch["input_ids"][0].tolist() != mine["input_ids"] or batch["labels"][0].tolist() != mine["labels"]:
        raise RuntimeError(f"find_influential encodes {prompt!r} otherwise than the benchmark does")


def batch_of(examples: Sequence[dict[str, Any]], pad: int) -> dict[str, torch.Tensor]:
    return collate([{k: v for k, v in ex.items() if k in ("input_ids", "labels")} for ex in examples], pad)


@torch.no_grad()
def completion_logprob(model: Any, queries: Sequence[dict[str, list[int]]], pad: int, batch_size: int = 16) -> torch.Tensor:
    """``log p(completion | prompt)`` per query (float64 sums of float32 token log-probs)."""
    out = []
    for lo in range(0, len(queries), batch_size):
        batch = batch_of(queries[lo : lo + batch_size], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = per_example_loss(logits, batch["labels"], "sum", batch["attention_mask"])
        out.append(-loss.double())
    return torch.cat(out)


# ---- fine-tuning ----------------------------------------------------------------------------------


def training_key(settings: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    blob = json.dumps([settings, [r["input_ids"] for r in rows]], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def fine_tune(model: Any, tokenizer: Any, rows: list[dict[str, Any]], settings: dict[str, Any],
              cache_root: Path, output_dir: Path) -> dict[str, Any]:  # fmt: skip
    """Train ``model`` in place on ``rows`` through ``AttributionTrainer.train()``, or load the weights
    a run with the same settings and documents saved under ``cache_root`` (then no training)."""
    from safetensors.torch import load_model, save_model

    folder = cache_root / f"real_llm_ft_{settings['seed']}_{training_key(settings, rows)}"
    weights = folder / "model.safetensors"
    if weights.is_file():
        load_model(model, str(weights))
        info = json.loads((folder / "training.json").read_text())
        return {**info, "cached": str(folder)}
    trainer = make_trainer(model, tokenizer, rows, settings, GraSSConfig(), output_dir)
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    info = {"settings": settings, "train_seconds": seconds, "train_loss": output.training_loss,
            "last_logged_loss": losses[-1] if losses else None}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(weights))
    (folder / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "cached": None}


def make_trainer(model: Any, tokenizer: Any, rows: list[dict[str, Any]], settings: dict[str, Any],
                 grass_config: GraSSConfig, output_dir: Path) -> Any:  # fmt: skip
    """An ``AttributionTrainer`` over ``rows`` (AdamW, constant learning rate after a short warm-up,
    batches grouped by length so short facts are not padded to docstring length)."""
    from transformers import TrainingArguments

    from hf_grass import AttributionTrainer

    # the GGUF weights are dequantised to float32 on load, but the model still carries the GGUF
    # quantizer's marks, which make the Trainer refuse to train it
    model.is_quantized, model.hf_quantizer = False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    args = TrainingArguments(
        output_dir=str(output_dir),  # nothing is saved there (save_strategy="no")
        num_train_epochs=settings["epochs"],
        learning_rate=settings["lr"],
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=8,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=settings.get("warmup_steps", 5),
        weight_decay=0.0,
        seed=settings["seed"],
        data_seed=settings["seed"],
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        logging_steps=10,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    return AttributionTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=lambda examples: batch_of(examples, pad),
        processing_class=tokenizer,
        grass_config=grass_config,
    )


# ---- the model's own accuracy -----------------------------------------------------------------------


@torch.no_grad()
def fact_accuracy(model: Any, tokenizer: Any, questions: Sequence[Any], generate: bool = True,
                  max_new_tokens: int = 8) -> dict[str, Any]:  # fmt: skip
    """Per question: whether greedy generation contains the answer (with ``generate``), and the
    answer's rank by ``log p(answer | question)`` among every answer of its type (0 = first)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    options = [encode_query(tokenizer, q.prompt, " " + c) for q in questions for c in q.candidates]
    logp = completion_logprob(model, options, pad).tolist()
    ranks, at = [], 0
    for q in questions:
        mine = logp[at : at + len(q.candidates)]
        at += len(q.candidates)
        ranks.append(sum(v > mine[q.candidates.index(q.answer)] for v in mine))
    out: dict[str, Any] = {"answer_rank": ranks, "rank1": sum(r == 0 for r in ranks) / len(ranks)}
    if not generate:
        return out
    generated = []
    for q in questions:
        prompt = encode_query(tokenizer, q.prompt, q.completion)
        ids = torch.tensor([prompt["input_ids"][: prompt["labels"].count(IGNORE_INDEX)]])
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)[0, ids.shape[1] :]  # fmt: skip
        generated.append(tokenizer.decode(new, skip_special_tokens=True))
    correct = [q.answer.lower() in g.lower() for q, g in zip(questions, generated)]
    return {**out, "generated": generated, "correct": correct, "accuracy": sum(correct) / len(correct)}


# ---- TrackStar's tail-patch -------------------------------------------------------------------------


class TailPatch:
    """``log p(answer | question)`` after one SGD step of size ``lr`` on a document's summed token
    loss, minus before, from the final weights (restored after every step). Memoised per pair, since
    methods often agree on the top document."""

    def __init__(self, model: Any, pad: int, lr: float):
        self.model, self.pad, self.lr = model, pad, lr
        self.params = [p for p in model.parameters()]
        self.memo: dict[tuple[int, int], float] = {}
        self.base: dict[int, float] = {}

    def delta(self, qi: int, query: dict[str, list[int]], di: int, doc: dict[str, Any]) -> float:
        if (qi, di) in self.memo:
            return self.memo[(qi, di)]
        if qi not in self.base:
            self.base[qi] = float(completion_logprob(self.model, [query], self.pad)[0])
        saved = [p.detach().clone() for p in self.params]
        try:
            for p in self.params:
                p.requires_grad_(True)
            batch = batch_of([doc], self.pad)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = per_example_loss(logits, batch["labels"], "sum", batch["attention_mask"]).sum()
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(self.params, grads):
                    if g is not None:  # tied weights appear once in parameters(): one update each
                        p.sub_(self.lr * g)
            after = float(completion_logprob(self.model, [query], self.pad)[0])
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)
                    p.requires_grad_(False)
        value = after - self.base[qi]
        if not math.isfinite(value):
            raise RuntimeError(f"tail-patch of query {qi} on document {di} is not finite")
        self.memo[(qi, di)] = value
        return value
