"""GraSSCallback on an existing, unmodified Trainer: cache at train end and per checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_grass import GradientCache, GraSSCallback, GraSSConfig
from hf_grass.checkpoints import load_checkpoint
from hf_grass.lookups import MultiCheckpointAttributor
from hf_grass.query import Attributor
from hf_grass.testing import planted_facts_corpus, tiny_gpt2, word_tokenizer


def setup(tmp_path: Path, epochs: int, save_steps: int | None = None, **callback_kwargs):
    docs, facts = planted_facts_corpus(n_facts=8, n_filler=24, seed=1)
    tokenizer = word_tokenizer([w for d in docs for w in d.split()])
    model = tiny_gpt2(len(tokenizer), n_layer=2, n_embd=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    train = Dataset.from_dict({"text": docs}).map(lambda b: tokenizer(b["text"]), batched=True)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy=("steps" if save_steps else "epoch") if callback_kwargs.get("every_save") else "no",
        save_steps=save_steps or 500,
        use_cpu=True,
        seed=0,
    )
    config = GraSSConfig(
        compressor="factgrass", proj_dim=1024, cache_dir=str(tmp_path / "cache"), shard_size=8
    )
    callback = GraSSCallback(config, **callback_kwargs)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[callback],
    )
    return trainer, callback, docs, facts, tokenizer


def test_cache_built_at_train_end(tmp_path: Path) -> None:
    trainer, callback, docs, facts, tokenizer = setup(tmp_path, epochs=40)
    trainer.train()
    assert isinstance(callback.cache, GradientCache)
    assert callback.cache.num_rows == len(docs)
    assert callback.cache.indices.tolist() == list(range(len(docs)))  # dataset order, not shuffled
    # the text column was removed by the Trainer; documents are decoded from the token ids
    assert callback.cache.documents([0])[0]["text"] == docs[0]
    assert not any(m._forward_hooks for m in trainer.model.modules())  # hooks only during the pass
    hits = sum(
        callback.find_influential(f["prompt"], k=3, completion=" " + f["answer"]).documents[0].index
        == f["doc"]
        for f in facts
    )
    assert hits >= 7, f"{hits}/8"
    # same scores as an Attributor on the same cache
    queries = [{"input_ids": tokenizer(facts[0]["prompt"] + " " + facts[0]["answer"])["input_ids"]}]
    torch.testing.assert_close(
        callback.attribute(queries), Attributor(trainer.model, tokenizer, callback.cache).attribute(queries)
    )


def test_every_save_sums_over_checkpoints(tmp_path: Path) -> None:
    trainer, callback, docs, facts, tokenizer = setup(tmp_path, epochs=2, every_save=True, on_train_end=False)
    trainer.train()
    steps = sorted(callback.checkpoint_caches)
    assert len(steps) == 2 and callback.cache is None
    for step in steps:
        cache = callback.checkpoint_caches[step]
        assert cache.path == tmp_path / "cache" / f"checkpoint-{step}"
        assert cache.model_info["checkpoint"].endswith(f"checkpoint-{step}")
    queries = []
    for f in facts[:3]:  # the loss on the answer only, as find_influential does
        prompt, answer = tokenizer(f["prompt"])["input_ids"], tokenizer(f["answer"])["input_ids"]
        queries.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    summed = callback.attribute(queries, checkpoint_weights="uniform")
    weighted = callback.attribute(queries)  # TracIn-CP: each checkpoint weighted by its learning rate
    # brute force: load each checkpoint into a fresh model and attribute with its own cache
    expected = torch.zeros_like(summed)
    expected_weighted = torch.zeros_like(summed)
    for step in steps:
        fresh = tiny_gpt2(
            len(tokenizer), n_layer=2, n_embd=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
        load_checkpoint(fresh, tmp_path / "out" / f"checkpoint-{step}")
        scores = Attributor(fresh, tokenizer, callback.checkpoint_caches[step]).attribute(queries)
        lr = callback.checkpoint_caches[step].model_info["learning_rate"]
        assert 0 < lr <= trainer.args.learning_rate  # what the Trainer's state held at that step
        expected += scores
        expected_weighted += lr * scores
    torch.testing.assert_close(summed, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    torch.testing.assert_close(
        weighted, expected_weighted, rtol=1e-4, atol=1e-4 * expected_weighted.abs().max().item()
    )
    summed = weighted  # what find_influential sums by default
    final = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = callback.find_influential(facts[0]["prompt"], k=4, completion=" " + facts[0]["answer"])
    assert [d.score for d in result.documents] == sorted((d.score for d in result.documents), reverse=True)
    torch.testing.assert_close(result.documents[0].score, float(summed[0].max()), rtol=1e-4, atol=1e-3)
    for k, v in trainer.model.state_dict().items():  # the final weights are restored
        assert torch.equal(v, final[k]), k


def test_one_checkpoint_before_the_end_scores_at_its_weights(tmp_path: Path) -> None:
    # a multi-checkpoint lookup with one cache, from a checkpoint saved before training ended: the
    # model that answers (the final one) differs from the cache's, so the query gradient must be
    # taken at the checkpoint's weights (it used to be taken at the final ones)
    trainer, callback, _, facts, tokenizer = setup(
        tmp_path, epochs=2, save_steps=4, every_save=True, on_train_end=False
    )
    trainer.train()
    assert trainer.state.global_step == 8 and 4 in callback.checkpoint_caches
    cache = callback.checkpoint_caches[4]
    fact = facts[0]
    lookup = MultiCheckpointAttributor(trainer.model, tokenizer, [cache])
    result = lookup.find_influential(fact["prompt"], k=4, completion=" " + fact["answer"])
    fresh = tiny_gpt2(len(tokenizer), n_layer=2, n_embd=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    load_checkpoint(fresh, tmp_path / "out" / "checkpoint-4")
    at_checkpoint = Attributor(fresh, tokenizer, cache).find_influential(
        fact["prompt"], k=4, completion=" " + fact["answer"]
    )
    lr = cache.model_info["learning_rate"]
    assert [d.index for d in result.documents] == [d.index for d in at_checkpoint.documents]
    torch.testing.assert_close(
        torch.tensor([d.score for d in result.documents]),
        lr * torch.tensor([d.score for d in at_checkpoint.documents]),
        rtol=1e-4,
        atol=1e-6,
    )
    # the streaming lists of a dataset of queries, and a scoring pass, also at the checkpoint's weights
    queries = [{"text": f["prompt"] + " " + f["answer"]} for f in facts[:2]]
    want = Attributor(fresh, tokenizer, cache).attribute_top_k(queries, 3)
    got = lookup.attribute_top_k(queries, 3)
    assert got.top.indices.tolist() == want.top.indices.tolist()
    torch.testing.assert_close(got.top.scores, want.top.scores, rtol=1e-4, atol=1e-6)
    during = lookup.score_dataset(trainer.train_dataset, queries, k=3)
    assert during.top.indices.tolist() == want.top.indices.tolist()
