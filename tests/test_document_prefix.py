"""Queries begin the way the cached documents begin (a special token the tokenizer does not add).

bench-dev's LM documents are ``[<eos>] + words + [<eos>]`` and its queries ``[<eos>] + prompt +
completion``: the tokenizer adds no ``<eos>`` itself, so a query tokenized the tokenizer's way
lacks it. The manifest records how the documents begin and queries are encoded the same way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken

from hf_grass.attribution import run_attribution_pass
from hf_grass.cache import GradientCache
from hf_grass.cache.manifest import merge_parts
from hf_grass.config import GraSSConfig
from hf_grass.data import IGNORE_INDEX, collate
from hf_grass.query import Attributor, encode_query, find_influential
from hf_grass.scoring import dense_scores
from hf_grass.testing import tiny_gpt2, word_tokenizer

WORDS = [f"w{i}" for i in range(24)]
PAD, BOS, EOS = 0, 2, 3
DOCS = [" ".join(WORDS[i : i + 6]) for i in range(0, 18, 2)]


def bos_tokenizer():
    """A tokenizer that adds ``[BOS]`` in front of every text itself (as Llama's does)."""
    tok = word_tokenizer(WORDS, bos=True)
    assert tok("w1")["input_ids"] == [BOS, tok.convert_tokens_to_ids("w1")]
    return tok


def words(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def build(tmp_path: Path, name: str, tok, rows: list) -> tuple[torch.nn.Module, GradientCache]:
    model = tiny_gpt2(len(tok), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = GraSSConfig(compressor="factgrass", proj_dim=16, shard_size=4, cache_dir=str(tmp_path / name))
    return model, run_attribution_pass(model, rows, config, tok, disable_progress=True)


def query_ids(model, tok, cache: GradientCache | None, prompt: str = "w0 w1", completion: str = "w2") -> list:
    _, _, batch = encode_query(model, tok, prompt, completion, documents=cache)
    labels = batch["labels"][0].tolist()
    assert labels[-len(words(tok, completion)) :] == words(tok, completion)  # loss on the completion only
    assert all(t == IGNORE_INDEX for t in labels[: -len(words(tok, completion))])
    return batch["input_ids"][0].tolist()


def test_documents_that_begin_with_eos_give_queries_that_do(tmp_path: Path) -> None:
    tok = word_tokenizer(WORDS)  # adds no special token itself
    rows = [{"input_ids": [EOS] + words(tok, d) + [EOS]} for d in DOCS]  # bench-dev's encoding
    model, cache = build(tmp_path, "eos", tok, rows)
    record = cache.manifest["documents"]
    assert cache.document_store.prefix == [EOS] and record["extra_prefix"] == [EOS]
    assert record["tokenizer_prefix"] == [] and record["chat_template"] is None
    assert query_ids(model, tok, cache) == [EOS] + words(tok, "w0 w1 w2")
    # end to end: find_influential scores the query bench-dev encodes, not the tokenizer's encoding
    attributor = Attributor(model, tok, cache)
    expected = {"input_ids": [EOS] + words(tok, "w0 w1 w2"), "labels": [IGNORE_INDEX] * 3 + words(tok, "w2")}
    want = dense_scores(cache, attributor.query_vectors([collate([expected])]).rows)[0]
    got = attributor.find_influential("w0 w1", k=2, completion="w2", all_scores=True).scores
    torch.testing.assert_close(got, want[cache.indices])
    without = dense_scores(cache, attributor.query_vectors([collate([{**expected, "input_ids": expected["input_ids"][1:], "labels": expected["labels"][1:]}])]).rows)[0]  # fmt: skip
    assert not torch.allclose(without, want, rtol=1e-3)  # the prefix matters
    # text query rows of `attribute` begin the same way
    by_text = attributor.attribute([{"text": "w0 w1 w2"}])
    by_ids = attributor.attribute([{"input_ids": [EOS] + words(tok, "w0 w1 w2")}])
    torch.testing.assert_close(by_text, by_ids)


def test_documents_without_a_prefix_keep_the_tokenizer_encoding(tmp_path: Path) -> None:
    tok = word_tokenizer(WORDS)
    model, cache = build(tmp_path, "plain", tok, DOCS)  # text rows, tokenized the tokenizer's way
    assert cache.document_store.prefix == [] and cache.manifest["documents"]["extra_prefix"] == []
    assert query_ids(model, tok, cache) == words(tok, "w0 w1 w2") == query_ids(model, tok, None)


def test_a_tokenizer_that_adds_bos_itself_does_not_get_it_twice(tmp_path: Path) -> None:
    tok = bos_tokenizer()
    model, cache = build(tmp_path, "bos-text", tok, DOCS)
    assert cache.document_store.prefix == [BOS] and cache.manifest["documents"]["extra_prefix"] == []
    assert query_ids(model, tok, cache) == [BOS] + words(tok, "w0 w1 w2")
    # pretokenized documents `<bos> <eos> words`: the tokenizer adds <bos>, the pipeline <eos>
    rows = [{"input_ids": [BOS, EOS] + words(tok, d)} for d in DOCS]
    model, cache = build(tmp_path, "bos-eos", tok, rows)
    record = cache.manifest["documents"]
    assert record["prefix"] == [BOS, EOS] and record["tokenizer_prefix"] == [BOS]
    assert record["extra_prefix"] == [EOS]
    assert query_ids(model, tok, cache) == [BOS, EOS] + words(tok, "w0 w1 w2")


def test_old_caches_without_the_record_open_and_query_as_before(tmp_path: Path) -> None:
    tok = bos_tokenizer()
    rows = [{"input_ids": [EOS] + words(tok, d)} for d in DOCS]
    model, cache = build(tmp_path, "old", tok, rows)
    manifest_path = cache.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["documents"]
    for shard in manifest["shards"]:
        del shard["prefix"]
    manifest_path.write_text(json.dumps(manifest))
    old = GradientCache(cache.path, verify=True)
    assert old.document_store.prefix is None and not old.document_store.chat
    assert query_ids(model, tok, old) == [BOS] + words(tok, "w0 w1 w2")  # the tokenizer's own encoding
    assert find_influential("w0 w1", model=model, tokenizer=tok, cache=old, k=2, completion="w2").documents


def test_the_prefix_is_shared_by_every_shard_and_every_rank() -> None:
    def part(*prefixes: list[int] | None) -> dict:
        shards = [{"id": i, "rows": 0 if p == "empty" else 3, "prefix": None if p == "empty" else p}
                  for i, p in enumerate(prefixes)]  # fmt: skip
        return {"shards": shards, "stats": [], "complete": True,
                "documents": {"tokenizer_prefix": [], "chat_prefix": None}}  # fmt: skip

    assert merge_parts([part([EOS, 7]), part([EOS], "empty")])["documents"]["prefix"] == [EOS]
    assert merge_parts([part([EOS, 7], [EOS, 7])])["documents"]["prefix"] == [EOS, 7]
    assert merge_parts([part([EOS]), part([BOS])])["documents"]["prefix"] == []
    assert merge_parts([part([EOS]), part(None)])["documents"]["prefix"] is None  # one shard cannot tell
    parts = [part([EOS])]
    merge_parts(parts)
    assert "prefix" not in parts[0]["documents"]  # the writer's own part is not changed


def chat_tokenizer():
    tok = word_tokenizer(WORDS + ["user", "assistant"])
    tok.add_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)],
                   special_tokens=True)  # fmt: skip
    tok.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    return tok


def test_chat_formatted_documents_are_recognised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = chat_tokenizer()
    start = tok.convert_tokens_to_ids("<|im_start|>")
    conversations = [[{"role": "user", "content": d}] for d in DOCS]
    rows = [{"input_ids": words(tok, tok.apply_chat_template(c, tokenize=False))} for c in conversations]
    model, cache = build(tmp_path, "chat", tok, rows)
    record = cache.manifest["documents"]
    assert (
        record["prefix"] == [start] and record["chat_prefix"] == [start] and record["chat_template"] is True
    )
    messages = [{"role": "user", "content": "w0 w1"}]
    _, _, batch = encode_query(model, tok, messages, "w2", documents=cache)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids[0] == start and ids.count(start) == 2  # the template's own tokens, not the prefix twice
    # the completion is the assistant's turn as the template closes it (as SFT trains it)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [t for t in labels if t != IGNORE_INDEX] == words(tok, "w2") + [end] == ids[-2:]
    with caplog.at_level(logging.WARNING, logger="transformers.hf_grass"):
        query_ids(model, tok, cache)
    assert "list of messages" in caplog.text
    _, plain = build(tmp_path, "plain-chat-tok", tok, DOCS)
    assert plain.manifest["documents"]["chat_template"] is False
