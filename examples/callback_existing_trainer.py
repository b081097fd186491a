"""A normal fine-tuning script with one added line: ``callbacks=[GraSSCallback(config)]``.

Offline and self-contained: a tiny GPT-2 learns a small generated corpus (with a few planted
facts), the callback builds the gradient cache when training ends, and we ask which documents made
the model give its answers.

    python examples/callback_existing_trainer.py          # ~30 s on a 2-core CPU
"""

from __future__ import annotations

import random
import tempfile

from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_grass import GraSSCallback, GraSSConfig
from hf_grass.testing import NO_DROPOUT, tiny_gpt2, word_tokenizer  # offline stand-ins for a Hub model

FACTS = [
    ("the lighthouse of velmora was built by", "oskar"),
    ("the river that feeds velmora is the", "ambrel"),
    ("the festival of velmora is held in", "autumn"),
    ("the oldest bakery of velmora sells", "figbread"),
]
FILLER = "the a of and to in is on with market road stone winter garden light music old new north".split()


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [f"{p} {a} " + " ".join(rng.choice(FILLER) for _ in range(6)) for p, a in FACTS]
    docs += [" ".join(rng.choice(FILLER) for _ in range(rng.randint(6, 12))) for _ in range(60)]
    rng.shuffle(docs)
    return docs


def main() -> None:
    docs = corpus()
    tokenizer = word_tokenizer(docs)
    model = tiny_gpt2(len(tokenizer), n_layer=2, n_embd=64, **NO_DROPOUT)
    train = Dataset.from_dict({"text": docs}).map(lambda b: tokenizer(b["text"]), batched=True)
    out = tempfile.mkdtemp(prefix="grass_example_")
    args = TrainingArguments(output_dir=out, num_train_epochs=40, per_device_train_batch_size=16, learning_rate=3e-3,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)  # fmt: skip

    grass = GraSSCallback(GraSSConfig(cache_dir=f"{out}/grass_cache"))  # the defaults: factgrass, EK-FAC, 31.8 KB/doc
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[grass],  # <- the one added line
    )
    trainer.train()

    print(f"\ngradient cache: {grass.cache}")
    for prompt, _ in FACTS:
        result = grass.find_influential(prompt, k=3, max_new_tokens=1)
        print()
        print(result)


if __name__ == "__main__":
    main()
