"""Tiny offline stand-ins for the tests, the docs' figures, the examples, the benchmarks and the demo.

Nothing here comes from the Hugging Face Hub: a word-level tokenizer built with ``tokenizers``,
GPT-2, Llama and mixture-of-experts models of a few thousand parameters built from a config with a fixed seed, and the
planted-facts corpus (made-up facts such as "the capital of kazori is telvas" among filler text).
One home for them, so a test and the figure that shows the same setup cannot drift apart.

This module is a leaf: nothing in the package imports it but the demo (``hf-grass demo``), and it
imports nothing from the package. It needs no test framework.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

# The special tokens take the first ids, in this order, in every tokenizer built here; the tiny
# models' configs name the same ids.
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# GPT-2's dropout off: with it the per-example gradients (and any score) depend on the dropout draw
NO_DROPOUT: dict[str, float] = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def word_tokenizer(
    texts: Iterable[str], *, punctuation: bool = False, bos: bool = False, padding_side: str = "right"
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is ``SPECIALS`` then every word of ``texts``, sorted.

    Args:
        texts: documents (or single words); every word in them gets a token, so nothing encodes to
            ``[UNK]`` and each made-up name is one token.
        punctuation: split punctuation from words (``"paris."`` is ``"paris"``, ``"."``) instead of
            splitting on white space only.
        bos: the tokenizer puts ``[BOS]`` in front of every text itself (as Llama's does), so a
            prompt sits at the same positions as in training.
        padding_side: ``"right"`` or ``"left"``.
    """
    pre = pre_tokenizers.Whitespace() if punctuation else pre_tokenizers.WhitespaceSplit()
    words = {w for text in texts for w, _ in pre.pre_tokenize_str(text)}
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(words - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ." -> "."
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        padding_side=padding_side,
    )


def tiny_gpt2(
    vocab_size: int, n_layer: int = 2, n_embd: int = 32, seed: int = 0, tie: bool = False, **overrides: Any
) -> GPT2LMHeadModel:
    """A GPT-2 of ``n_layer`` blocks of width ``n_embd`` (2 heads, 64 positions), weights drawn after
    ``torch.manual_seed(seed)``; ``overrides`` are further ``GPT2Config`` fields (``n_head``,
    ``n_positions``, ``**NO_DROPOUT``...)."""
    fields: dict[str, Any] = {
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_head": 2,
        "vocab_size": vocab_size,
        "n_positions": 64,
        "tie_word_embeddings": tie,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**fields, **overrides}))


def tiny_llama(
    vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, tie: bool = False
) -> LlamaForCausalLM:
    """A Llama of ``layers`` blocks of width ``hidden`` (2 heads), weights drawn after
    ``torch.manual_seed(seed)``; ``tie``: input and output embeddings share one weight (SmolLM2)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


MOE_FAMILIES = ("mixtral", "olmoe", "qwen3_moe")


def tiny_moe(
    family: str, vocab_size: int, seed: int = 0, hidden: int = 16, experts: int = 4, implementation: str | None = None
) -> PreTrainedModel:
    """A 2-layer mixture-of-experts LM of ``family`` (Mixtral, OLMoE or Qwen3-MoE: transformers 5's
    3-D expert weights), ``experts`` experts of which 2 per token, weights drawn after
    ``torch.manual_seed(seed)``; ``implementation`` sets ``experts_implementation`` (default:
    transformers' own choice, ``grouped_mm`` on a CPU)."""
    import transformers

    names = {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": experts}),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": experts}),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": experts, "moe_intermediate_size": 12}),
    }
    if family not in names:
        raise ValueError(f"family must be one of {', '.join(MOE_FAMILIES)}, got {family!r}")
    config_name, model_name, fields = names[family]
    cfg = getattr(transformers, config_name)(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        **fields,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    if implementation is not None:
        model.set_experts_implementation(implementation)
    return model


def random_token_examples(n: int, vocab_size: int, lo: int = 3, hi: int = 12, seed: int = 0) -> list[dict]:
    """``n`` examples ``{"input_ids": [...]}`` of ``lo`` to ``hi - 1`` random non-special tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        out.append({"input_ids": torch.randint(len(SPECIALS), vocab_size, (length,), generator=gen).tolist()})
    return out


# ---- the planted-facts corpus -----------------------------------------------------------------------

SYLLABLES = ["ka", "zo", "ri", "mu", "tel", "vas", "quo", "ne", "bri", "lom", "sa", "dex", "fin", "gor", "pal", "wy"]
FILLER = (
    "the a of and to in is was on for with as by at from that this it be are or an which "
    "river stone market winter garden light story music city road north south old new"
).split()


def planted_facts_corpus(n_facts: int = 12, n_filler: int = 60, seed: int = 0) -> tuple[list[str], list[dict]]:
    """Documents stating made-up facts ("the capital of X is Y"), mixed with filler text, shuffled.

    Returns the documents and, per fact, ``{"doc": index, "prompt": ..., "answer": ...}``.
    """
    rng = random.Random(seed)

    def name() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(3))

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
    where = {old: new for new, old in enumerate(order)}
    for i, fact in enumerate(facts):
        fact["doc"] = where[i]
    return [docs[i] for i in order], facts
