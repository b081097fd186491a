"""End to end through AttributionTrainer: train a tiny LM on planted facts, then find their sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from hf_grass import AttributionTrainer, GradientCache, GraSSConfig, find_influential
from hf_grass.testing import planted_facts_corpus, tiny_gpt2, word_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A tiny GPT-2 trained until it recites 12 planted facts; its cache is built once."""
    tmp = tmp_path_factory.mktemp("trainer")
    docs, facts = planted_facts_corpus(n_facts=12, n_filler=48, seed=0)
    words = [w for d in docs for w in d.split()]
    tokenizer = word_tokenizer(words)
    model = tiny_gpt2(len(tokenizer), n_layer=2, n_embd=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    train = Dataset.from_dict({"text": docs}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=[]
    )
    args = TrainingArguments(
        output_dir=str(tmp / "out"),
        num_train_epochs=60,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
    )
    config = GraSSConfig(compressor="factgrass", proj_dim=1024, cache_dir=str(tmp / "cache"), shard_size=16)

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    trainer = AttributionTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=collate,
        grass_config=config,
    )
    trainer.train()
    cache = trainer.build_gradient_cache()
    return trainer, cache, facts, docs, tokenizer


def test_planted_facts_are_found(trained) -> None:
    trainer, cache, facts, docs, _ = trained
    assert isinstance(cache, GradientCache) and cache.num_rows == len(docs)
    hits = 0
    for fact in facts:
        result = trainer.find_influential(fact["prompt"], k=5, completion=" " + fact["answer"])
        assert result.documents[0].score >= result.documents[-1].score
        assert result.harmful[0].score <= result.harmful[-1].score
        hits += result.documents[0].index == fact["doc"]
        assert result.documents[0].text == docs[result.documents[0].index]
    # chance is 1/60; measured: 12/12 at proj_dim=1024 (EK-FAC, the default)
    assert hits >= 11, f"planted document ranked first for only {hits}/12 facts"


def test_planted_facts_at_small_proj_dim(trained, tmp_path: Path) -> None:
    """At proj_dim=256 the masks keep 32 of the 65 inputs of each factor; still far above chance (1/60)."""
    trainer, _, facts, _, tokenizer = trained
    config = GraSSConfig(compressor="factgrass", proj_dim=256, cache_dir=str(tmp_path / "c256"))
    small = AttributionTrainer(
        model=trainer.model, args=trainer.args, processing_class=tokenizer, grass_config=config
    )
    small.build_gradient_cache(trainer.train_dataset)
    hits = sum(
        small.find_influential(f["prompt"], k=3, completion=" " + f["answer"]).documents[0].index == f["doc"]
        for f in facts
    )
    assert hits >= 6, f"only {hits}/12 at proj_dim=256 (measured 7/12)"


def test_generated_completion_and_module_level_api(trained) -> None:
    trainer, cache, facts, _, tokenizer = trained
    fact = facts[0]
    result = trainer.find_influential(fact["prompt"], k=3, max_new_tokens=1)
    assert result.completion.strip() == fact["answer"]  # the trained model recites the fact
    assert result.documents[0].index == fact["doc"]
    again = find_influential(
        fact["prompt"], model=trainer.model, tokenizer=tokenizer, cache=cache.path, k=3, max_new_tokens=1
    )
    assert [d.index for d in again.documents] == [d.index for d in result.documents]
    assert "Most helpful training documents" in str(result)


def test_attribute_matrix(trained) -> None:
    trainer, cache, facts, docs, _ = trained
    tok = trainer.processing_class
    rows = []
    for fact in facts[:4]:
        p = tok(fact["prompt"])["input_ids"]
        a = tok(" " + fact["answer"], add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    queries = Dataset.from_list(rows)
    scores = trainer.attribute(queries)
    assert scores.shape == (4, len(docs))
    assert [int(s.argmax()) for s in scores] == [f["doc"] for f in facts[:4]]
    # another damping needs no refit
    assert trainer.attribute(queries, damping=1.0).argmax(1).tolist() == [f["doc"] for f in facts[:4]]
    # cosine-normalised (on a K-FAC cache the train norm is the whitened one, RelatIF-like)
    cosine = trainer.attribute(queries, cosine=True)
    assert cosine.abs().max() <= 1 + 1e-5
    assert cosine.argmax(1).tolist() == [f["doc"] for f in facts[:4]]
    # batched lists without the dense matrix: the same as the dense scores' top-k and bottom-k
    lists = trainer.attribute_top_k(queries, 3)
    best, worst = scores.topk(3, dim=1), scores.topk(3, dim=1, largest=False)
    torch.testing.assert_close(lists.top.scores, best.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lists.bottom.scores, worst.values, rtol=1e-5, atol=1e-6)
    assert torch.equal(lists.top.indices, best.indices) and torch.equal(lists.bottom.indices, worst.indices)


def test_bad_queries_are_refused(trained) -> None:
    trainer, cache, facts, _, _ = trained
    with pytest.raises(ValueError, match="prompt is empty"):
        trainer.find_influential("  ", completion=" x")
    with pytest.raises(ValueError, match="k must be a positive int"):
        trainer.find_influential(facts[0]["prompt"], k=0, completion=" x")
    with pytest.raises(ValueError, match="exceeds"):
        trainer.find_influential(facts[0]["prompt"], k=cache.num_rows + 1, completion=" x")
    other = tiny_gpt2(len(trainer.processing_class), n_layer=2, n_embd=64, seed=1)
    with pytest.raises(ValueError, match="weights differ"):
        find_influential(
            facts[0]["prompt"], model=other, tokenizer=trainer.processing_class, cache=cache, completion=" x"
        )


def test_rebuild_resumes_nothing_to_do(trained, tmp_path: Path) -> None:
    trainer, cache, _, _, _ = trained
    before = [s["sha256"] for s in cache.shards]
    again = trainer.build_gradient_cache()
    assert [s["sha256"] for s in again.shards] == before


def test_chat_messages_prompt(trained) -> None:
    trainer, _, facts, _, tokenizer = trained
    fact = facts[1]
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        chat = trainer.find_influential(
            [{"role": "user", "content": fact["prompt"]}], k=3, completion=" " + fact["answer"]
        )
    finally:
        tokenizer.chat_template = None
    plain = trainer.find_influential(fact["prompt"], k=3, completion=" " + fact["answer"])
    assert chat.prompt == fact["prompt"]
    assert [d.index for d in chat.documents] == [d.index for d in plain.documents]
    with pytest.raises(ValueError, match="no chat template"):
        trainer.find_influential([{"role": "user", "content": "hi"}], completion=" x")
    with pytest.raises(ValueError, match="role"):
        trainer.find_influential([{"text": "hi"}], completion=" x")
