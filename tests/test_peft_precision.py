"""PEFT LoRA models trained with the Trainer, and bf16 models (fp32 accumulation)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, TrainingArguments

from hf_grass import AttributionTrainer, GraSSConfig
from hf_grass.capture import GradientComputer
from hf_grass.data import collate
from hf_grass.testing import planted_facts_corpus, random_token_examples, tiny_llama, word_tokenizer

peft = pytest.importorskip("peft")
# measured: the planted document first for 6/6 facts and in the top 3 for 6/6 (proj_dim=64,
# OMP_NUM_THREADS=1); the bounds leave room for the trained weights to differ across thread counts
PEFT_TOP1, PEFT_TOP3 = 4, 5


def test_lora_trained_with_trainer_caches_lora_factors(tmp_path: Path) -> None:
    docs, facts = planted_facts_corpus(n_facts=6, n_filler=18, seed=2)
    tokenizer = word_tokenizer([w for d in docs for w in d.split()])
    base = tiny_llama(len(tokenizer), hidden=64)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train = Dataset.from_dict({"text": docs}).map(lambda b: tokenizer(b["text"]), batched=True)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=30, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], disable_tqdm=True, save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
    )  # fmt: skip
    config = GraSSConfig(compressor="factgrass", proj_dim=64, cache_dir=str(tmp_path / "cache"))
    trainer = AttributionTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), grass_config=config,
    )  # fmt: skip
    trainer.train()
    cache = trainer.build_gradient_cache()
    names = cache.module_names
    assert len(names) == 2 * 3 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert cache.model_info["class"].startswith("PeftModel")
    # the base model stayed frozen and untouched; LoRA weights still train afterwards
    for name, param in model.named_parameters():
        if name in frozen:
            assert not param.requires_grad and torch.equal(param, frozen[name])
    assert any(p.requires_grad for p in model.parameters())
    # the planted document of each fact is found (among 24 documents; chance is 1 in 24 for top-1)
    ranks = []
    for fact in facts:
        result = trainer.find_influential(fact["prompt"], k=3, completion=" " + fact["answer"])
        assert len(result.documents) == 3 and result.documents[0].score > 0
        order = [d.index for d in result.documents]
        ranks.append(order.index(fact["doc"]) if fact["doc"] in order else 3)
    print("planted-document ranks (3 = not in the top 3):", ranks)
    assert sum(r == 0 for r in ranks) >= PEFT_TOP1 and sum(r < 3 for r in ranks) >= PEFT_TOP3, ranks


def test_bf16_model_accumulates_in_fp32() -> None:
    model32 = tiny_llama(40)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    config = GraSSConfig(compressor="factgrass", proj_dim=16)
    batch = collate(random_token_examples(4, 40, seed=6))
    rows = {}
    for name, model in (("fp32", model32), ("bf16", model16)):
        computer = GradientComputer(model, config)
        with computer.session():
            rows[name] = computer.compute(batch).rows
    assert rows["bf16"].dtype == torch.float32  # accumulation and output in fp32, not bf16
    assert torch.isfinite(rows["bf16"]).all()
    # bf16 activations carry ~3 significant digits; the rows agree to that precision
    cos = torch.nn.functional.cosine_similarity(rows["bf16"], rows["fp32"], dim=1)
    assert cos.min() > 0.98, cos
