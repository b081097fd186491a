"""TRL: ``GraSSCallback`` on ``SFTTrainer``, ``AttributionMixin`` mixed into it, chat-formatted SFT data.

A tiny Llama and a word-level tokenizer with a ChatML-like template (``<|im_start|>``/``<|im_end|>``
special tokens). The SFT data are planted facts as chat turns: "the capital of X is" -> "Y".

The equality checked here is bit for bit: with the same weights, the SFTTrainer's callback and an
``AttributionTrainer`` given the raw chat rows feed the pass the same token ids and labels in the
same batches, and the pass is deterministic on one device; no float tolerance is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import AddedToken

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from hf_grass import AttributionMixin, AttributionTrainer, GradientCache, GraSSCallback, GraSSConfig  # noqa: E402
from hf_grass.data import IGNORE_INDEX  # noqa: E402
from hf_grass.prompts import encode_query  # noqa: E402
from hf_grass.testing import FILLER, planted_facts_corpus, tiny_llama, word_tokenizer  # noqa: E402

TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} <|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }} <|im_end|>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def chat_tokenizer(words: list[str]):
    tok = word_tokenizer(words + ["user", "assistant", "system"])
    tok.add_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)],
                   special_tokens=True)  # fmt: skip
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def corpus() -> dict[str, Any]:
    docs, facts = planted_facts_corpus(n_facts=6, n_filler=18, seed=3)
    rows = []
    for i, doc in enumerate(docs):
        words = doc.split()
        fact = next((f for f in facts if f["doc"] == i), None)
        # a fact's answer is the assistant's whole turn; filler is split after four words
        prompt, answer = (fact["prompt"], fact["answer"]) if fact else (" ".join(words[:4]), " ".join(words[4:]))
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "completion": [{"role": "assistant", "content": answer}]})  # fmt: skip
    tok = chat_tokenizer([w for d in docs for w in d.split()] + FILLER)
    return {"rows": rows, "facts": facts, "tok": tok}


def chat_dataset(rows: list[dict], shape: str) -> Dataset:
    if shape == "messages":
        return Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in rows])
    return Dataset.from_list(rows)


def sft_args(tmp_path: Path, **overrides: Any) -> Any:
    fields = dict(output_dir=str(tmp_path / "out"), num_train_epochs=3, per_device_train_batch_size=8,
                  learning_rate=3e-3, report_to=[], disable_tqdm=True, logging_strategy="no",
                  save_strategy="no", use_cpu=True, seed=0, dataset_num_proc=None)  # fmt: skip
    return trl.SFTConfig(**{**fields, **overrides})


def grass(tmp_path: Path, name: str) -> GraSSConfig:
    return GraSSConfig(compressor="factgrass", proj_dim=64, shard_size=8, batch_size=4,
                       cache_dir=str(tmp_path / name))  # fmt: skip


def assert_same_rows(a: GradientCache, b: GradientCache) -> None:
    """Bit-identical shards: indices, stored rows, norms; and the same documents."""
    assert a.num_rows == b.num_rows > 0 and a.dim == b.dim
    for x, y in zip(a.rows.iter_stored(), b.rows.iter_stored(), strict=True):
        assert torch.equal(x.indices, y.indices)
        assert torch.equal(x.grads, y.grads)
        assert x.norms is not None and y.norms is not None and torch.equal(x.norms, y.norms)
    assert a.documents() == b.documents()
    assert a.model_info["weights_sha256"] == b.model_info["weights_sha256"]


@pytest.mark.parametrize("shape", ["prompt-completion", "messages"])
def test_sft_callback_builds_the_cache_of_attribution_trainer(tmp_path: Path, corpus: dict, shape: str) -> None:
    tok, data = corpus["tok"], chat_dataset(corpus["rows"], shape)
    callback = GraSSCallback(grass(tmp_path, "callback"))
    sft = trl.SFTTrainer(model=tiny_llama(len(tok), hidden=32), args=sft_args(tmp_path, num_train_epochs=1),
                         train_dataset=data, processing_class=tok, callbacks=[callback])  # fmt: skip
    sft.train()
    assert callback.cache is not None and callback.cache.num_rows == len(data)
    # SFTConfig turns gradient checkpointing on; the pass runs in eval mode, where it is off, so the
    # rows do not depend on it: the second cache is built without it
    assert sft.model.is_gradient_checkpointing
    sft.model.gradient_checkpointing_disable()
    # the same data as raw chat rows, without TRL: hf_grass renders them as SFTTrainer did
    plain = AttributionTrainer(model=sft.model, args=TrainingArguments(str(tmp_path / "o2"), report_to=[],
                               use_cpu=True), train_dataset=data, processing_class=tok,
                               grass_config=grass(tmp_path, "plain"))  # fmt: skip
    assert_same_rows(callback.cache, plain.build_gradient_cache())
    record = callback.cache.manifest["documents"]
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert record["prefix"] == [start] and record["chat_template"] is True
    assert record["chat_template_sha256"] is not None
    # what SFT trained on: the completion only (with its <|im_end|>) for prompt-completion rows
    prepared = sft.train_dataset[0]
    supervised = [t for t in prepared["labels"] if t != IGNORE_INDEX]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    if shape == "prompt-completion":
        assert supervised[-1] == end and start not in supervised
    else:
        assert supervised == prepared["input_ids"]


def test_assistant_only_loss_is_what_the_cache_holds(tmp_path: Path, corpus: dict) -> None:
    tok, data = corpus["tok"], chat_dataset(corpus["rows"], "messages")
    callback = GraSSCallback(grass(tmp_path, "callback"))
    args = sft_args(tmp_path, max_steps=1, learning_rate=0.0, assistant_only_loss=True)
    sft = trl.SFTTrainer(model=tiny_llama(len(tok)), args=args, train_dataset=data, processing_class=tok,
                         callbacks=[callback])  # fmt: skip
    sft.train()
    # SFT's labels mask the user turns; the cache is that of the prepared rows, not of all tokens
    masked = AttributionTrainer(model=sft.model, args=TrainingArguments(str(tmp_path / "o2"), report_to=[],
                                use_cpu=True), train_dataset=sft.train_dataset, processing_class=tok,
                                grass_config=grass(tmp_path, "masked"))  # fmt: skip
    assert_same_rows(callback.cache, masked.build_gradient_cache())
    everything = masked.build_gradient_cache(dataset=data, cache_dir=tmp_path / "all")
    assert not torch.equal(callback.cache.load(), everything.load())


class SFTAttributionTrainer(AttributionMixin, trl.SFTTrainer):
    """The AttributionTrainer's behaviour on TRL's SFTTrainer."""


def test_mixin_trains_and_finds_the_planted_documents(tmp_path: Path, corpus: dict) -> None:
    tok, facts = corpus["tok"], corpus["facts"]
    data = chat_dataset(corpus["rows"], "prompt-completion")
    trainer = SFTAttributionTrainer(model=tiny_llama(len(tok)), train_dataset=data,
                                    args=sft_args(tmp_path, num_train_epochs=10), processing_class=tok,
                                    grass_config=grass(tmp_path, "mixin"))  # fmt: skip
    trainer.train()
    cache = trainer.build_gradient_cache()
    assert cache.num_rows == len(corpus["rows"]) and cache.document_store.chat
    hits = 0
    for fact in facts:
        result = trainer.find_influential([{"role": "user", "content": fact["prompt"]}], k=3,
                                          completion=fact["answer"])  # fmt: skip
        hits += result.documents[0].index == fact["doc"]
    assert hits >= len(facts) - 1, f"{hits}/{len(facts)}"
    # scores of a query dataset of the same conversations equal find_influential's
    fact = facts[0]
    row = {"prompt": [{"role": "user", "content": fact["prompt"]}],
           "completion": [{"role": "assistant", "content": fact["answer"]}]}  # fmt: skip
    found = trainer.find_influential(row["prompt"], k=3, completion=fact["answer"], all_scores=True)
    torch.testing.assert_close(trainer.attribute([row])[0, cache.indices], found.scores)


def test_a_chat_query_is_encoded_as_sft_encodes_the_documents(tmp_path: Path, corpus: dict) -> None:
    tok = corpus["tok"]
    prompt = [{"role": "system", "content": "the old city"}, {"role": "user", "content": "the river of"}]
    answer = "stone market"
    data = Dataset.from_list([{"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}])
    sft = trl.SFTTrainer(model=tiny_llama(len(tok)), args=sft_args(tmp_path), train_dataset=data,
                         processing_class=tok)  # fmt: skip
    prepared = sft.train_dataset[0]
    _, text, batch = encode_query(sft.model, tok, prompt, answer)
    assert text == answer
    assert batch["input_ids"][0].tolist() == prepared["input_ids"]
    assert batch["labels"][0].tolist() == prepared["labels"]
    # the completion's loss covers the assistant's closing token, as SFT trained it
    assert batch["labels"][0, -1].item() == tok.convert_tokens_to_ids("<|im_end|>")


def test_a_chat_query_with_another_template_is_flagged(tmp_path: Path, corpus: dict, caplog) -> None:
    tok = corpus["tok"]
    rows = chat_dataset(corpus["rows"][:4], "messages")
    trainer = AttributionTrainer(model=tiny_llama(len(tok)), args=TrainingArguments(str(tmp_path / "o"),
                                 report_to=[], use_cpu=True), train_dataset=rows, processing_class=tok,
                                 grass_config=grass(tmp_path, "c"))  # fmt: skip
    cache = trainer.build_gradient_cache()
    prompt = [{"role": "user", "content": "the river of"}]
    trainer.find_influential(prompt, k=2, completion="stone")
    assert "differs" not in caplog.text
    tok.chat_template = TEMPLATE.replace("<|im_start|> {{ m['role'] }}", "<|im_start|>")
    try:
        trainer.find_influential(prompt, k=2, completion="stone")
    finally:
        tok.chat_template = TEMPLATE
    assert "chat template differs" in caplog.text
    assert cache.manifest["documents"]["chat_template"] is True


def test_mixin_order_and_packed_rows_give_clear_errors(tmp_path: Path, corpus: dict) -> None:
    with pytest.raises(TypeError, match="AttributionMixin before the Trainer"):
        type("Wrong", (trl.SFTTrainer, AttributionMixin), {})
    tok = corpus["tok"]
    trainer = AttributionTrainer(model=tiny_llama(len(tok)), args=TrainingArguments(str(tmp_path / "o"),
                                 report_to=[], use_cpu=True), processing_class=tok,
                                 grass_config=grass(tmp_path, "p"))  # fmt: skip
    packed = [{"input_ids": [5, 6, 7, 8], "seq_lengths": [2, 2]}]
    with pytest.raises(ValueError, match="packs several documents"):
        trainer.build_gradient_cache(dataset=packed)
    with pytest.raises(ValueError, match="'completion' column of messages"):
        trainer.build_gradient_cache(dataset=[{"prompt": [{"role": "user", "content": "the"}]}])


def test_masks_left_to_the_collator_are_folded_into_labels() -> None:
    # TRL before 1.0 kept completion_mask / assistant_masks and let its collator mask the labels
    from hf_grass.data import ExampleSource

    rows = [{"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1], "assistant_masks": [1, 1, 1, 0]},
            {"input_ids": [5, 6, 7], "labels": [5, 6, 7], "completion_mask": [0, 0, 1]}]  # fmt: skip
    source = ExampleSource(rows)
    assert source.example(0)["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX]
    assert source.example(1)["labels"] == [5, 6, 7]  # given labels win, as in TRL
