"""Queries encoded the way the cached documents were: the prompt (text or chat messages) with the
documents' leading special tokens, the completion generated or given, the loss on the completion."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hf_grass.cache.reader import GradientCache
from hf_grass.capture.engine import unwrap_model
from hf_grass.chat import chat_ids, encode_chat, template_sha256
from hf_grass.data import (
    IGNORE_INDEX,
    begin_like,
    collate,
    encode_text,
    pad_token_id,
    padding_side,
    special_ids,
)

logger = logging.getLogger("transformers.hf_grass")


def encode_query(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | list[dict[str, str]],
    completion: str | None,
    *,
    documents: GradientCache | None = None,
    **generate_kwargs: Any,
) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(prompt text, completion text, a one-example batch whose loss covers the completion only).

    The query begins the way the cached ``documents`` begin (``GradientCache.document_store.prefix``):
    a string prompt starts with exactly the special token ids every document starts with, in place
    of those the tokenizer adds itself, so documents that begin with ``<eos>`` give a query that
    begins with ``<eos>``, and a tokenizer that adds ``<bos>`` does not put it in twice. Without a
    recorded prefix (older caches) the prompt is tokenized as the tokenizer does.

    A chat prompt (a list of messages) is encoded as TRL's ``SFTTrainer`` encodes a conversational
    prompt-completion example (``hf_grass.chat.encode_chat``): the prompt messages, then the
    completion as an assistant turn, rendered together by the chat template; the loss covers the
    completion and the tokens the template closes the turn with (``<|im_end|>``...), as SFT trains
    them. A generated completion is decoded to text and encoded the same way. The documents' prefix
    goes in front only when the rendering begins with no special token.
    """
    prompt_text = render_prompt(tokenizer, prompt)  # checks the messages and the template
    if isinstance(prompt, list):
        ids, labels, text = _encode_chat_query(
            model, tokenizer, prompt, completion, documents, **generate_kwargs
        )
        example = {"input_ids": ids, "labels": labels}
        return prompt_text, text, collate([example], pad_token_id(tokenizer), padding_side(tokenizer))
    prefix = documents.document_store.prefix if documents is not None else None
    if documents is not None and documents.document_store.chat:
        logger.warning(
            "The cached documents begin the way the chat template begins a conversation; pass the "
            "prompt as a list of messages so that the query is encoded like them."
        )
    prompt_ids = encode_text(tokenizer, prompt_text, prefix)
    if completion is None:
        completion_ids = generate(model, tokenizer, prompt_ids, **generate_kwargs)
    else:
        _check_completion(completion)
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not completion_ids:
        raise ValueError(
            "the completion is empty (the model generated nothing); pass completion=... explicitly"
        )
    text = tokenizer.decode(completion_ids, skip_special_tokens=True) if completion is None else completion
    example = {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }
    return prompt_text, text, collate([example], pad_token_id(tokenizer), padding_side(tokenizer))


def _encode_chat_query(
    model: nn.Module,
    tokenizer: Any,
    prompt: list[dict[str, str]],
    completion: str | None,
    documents: GradientCache | None,
    **generate_kwargs: Any,
) -> tuple[list[int], list[int], str]:
    """``encode_query`` for a chat prompt: (input ids, labels, completion text) of the SFT encoding
    of the prompt and the completion as the assistant's turn."""
    prefix = (documents.document_store.prefix if documents is not None else None) or []
    specials = special_ids(tokenizer)
    recorded = documents.manifest.get("documents") if documents is not None else None
    built_with = recorded.get("chat_template_sha256") if isinstance(recorded, dict) else None
    if built_with is not None and built_with != template_sha256(tokenizer):
        logger.warning(
            "The tokenizer's chat template differs from the one the cached documents were rendered with; "
            "the query is not encoded like them. Use the tokenizer (and chat template) of the training run."
        )
    if completion is None:
        prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
        prompt_ids, _ = begin_like(prompt_ids, [IGNORE_INDEX] * len(prompt_ids), prefix, specials)
        generated = generate(model, tokenizer, prompt_ids, **generate_kwargs)
        completion = tokenizer.decode(generated, skip_special_tokens=True) if generated else ""
        if not completion.strip():
            raise ValueError(
                "the completion is empty (the model generated nothing); pass completion=... explicitly"
            )
    else:
        _check_completion(completion)
    ids, trained = encode_chat(tokenizer, prompt, [{"role": "assistant", "content": completion}])
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, trained)]
    if all(t == IGNORE_INDEX for t in labels):
        raise ValueError(
            "the chat template renders nothing for the assistant's completion, so the query has no loss; "
            "check tokenizer.chat_template"
        )
    ids, labels = begin_like(ids, labels, prefix, specials)
    return ids, labels, completion


def _check_completion(completion: Any) -> None:
    if not isinstance(completion, str) or not completion:
        raise ValueError("completion must be a non-empty string (or None to generate one)")


def generate(model: nn.Module, tokenizer: Any, prompt_ids: list[int], **generate_kwargs: Any) -> list[int]:
    """Greedy (by default) completion token ids of a prompt, without the EOS token."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    kwargs = {"max_new_tokens": 32, "do_sample": False, "pad_token_id": pad_token_id(tokenizer)}
    kwargs.update(generate_kwargs)
    ids = torch.tensor([prompt_ids], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    finally:
        model.train(was_training)
    new = out[0, len(prompt_ids) :].tolist()
    # generation stops at any of these; the stop token ends the answer but is not part of it
    stops = set(_as_list(kwargs.get("eos_token_id"))) | set(
        _as_list(getattr(tokenizer, "eos_token_id", None))
    )
    stops |= set(_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
    for pos, token in enumerate(new):
        if token in stops:
            return new[:pos]
    return new


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise ValueError(
                "a chat prompt must be a non-empty list of {'role': ..., 'content': ...} messages"
            )
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; pass the prompt as a string")
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: pass the text whose completion you want to explain")
    return prompt
