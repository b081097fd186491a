"""Tiny models, tokenizers and corpora built offline for the tests (nothing comes from the Hub)."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def make_tokenizer(words: list[str], padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` (plus special tokens)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(words) - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        padding_side=padding_side,
    )
    return fast


def tiny_gpt2(
    vocab_size: int, n_layer: int = 2, n_embd: int = 32, seed: int = 0, tie: bool = False, **kw
) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=2,
        vocab_size=vocab_size,
        n_positions=64,
        tie_word_embeddings=tie,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        **kw,
    )
    return GPT2LMHeadModel(cfg)


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def random_token_examples(n: int, vocab_size: int, lo: int = 3, hi: int = 12, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        out.append({"input_ids": torch.randint(4, vocab_size, (length,), generator=gen).tolist()})
    return out


_SYLLABLES = [
    "ka",
    "zo",
    "ri",
    "mu",
    "tel",
    "vas",
    "quo",
    "ne",
    "bri",
    "lom",
    "sa",
    "dex",
    "fin",
    "gor",
    "pal",
    "wy",
]
FILLER = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "on",
    "for",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "it",
    "be",
    "are",
    "or",
    "an",
    "which",
    "river",
    "stone",
    "market",
    "winter",
    "garden",
    "light",
    "story",
    "music",
    "city",
    "road",
    "north",
    "south",
    "old",
    "new",
]


def planted_facts_corpus(
    n_facts: int = 12, n_filler: int = 60, seed: int = 0
) -> tuple[list[str], list[dict]]:
    """Documents stating made-up facts ("the capital of X is Y"), mixed with filler text.

    Returns the documents and, per fact, ``{"doc": index, "prompt": ..., "answer": ...}``.
    """
    rng = random.Random(seed)

    def name() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(3))

    relations = ["capital", "king", "river", "poet"]
    docs: list[str] = []
    facts = []
    for i in range(n_facts):
        subject, answer, rel = name(), name(), relations[i % len(relations)]
        filler = " ".join(rng.choice(FILLER) for _ in range(6))
        # the fact opens the document, so a prompt sees it at the same positions as in training
        docs.append(f"the {rel} of {subject} is {answer} {filler}")
        facts.append({"prompt": f"the {rel} of {subject} is", "answer": answer})
    for _ in range(n_filler):
        docs.append(" ".join(rng.choice(FILLER) for _ in range(rng.randint(6, 14))))
    order = list(range(len(docs)))
    rng.shuffle(order)
    shuffled = [docs[i] for i in order]
    where = {old: new for new, old in enumerate(order)}
    for i, fact in enumerate(facts):
        fact["doc"] = where[i]
    return shuffled, facts
