"""Chat-formatted data, tokenized exactly as TRL's ``SFTTrainer`` tokenizes it.

SFT datasets come in two conversational shapes (TRL's names):

- ``messages``: a list of ``{"role", "content"}`` dicts; the loss covers every token (TRL's default,
  ``assistant_only_loss=False``);
- ``prompt`` and ``completion``, both lists of messages; the loss covers the completion only (TRL's
  default ``completion_only_loss`` for such rows), including whatever the template closes an
  assistant turn with (``<|im_end|>``, ``<eos>``...).

Both are rendered by the tokenizer's chat template, which holds its own special tokens (the
tokenizer adds none). The documents of a cache built from SFT data are encoded this way, and so is
a chat query (``prompts.encode_query``: the prompt messages, then the completion as an assistant
turn), so that the query's completion tokens are the tokens the documents trained on.

This module returns which tokens carry loss as booleans; ``hf_grass.data`` turns them into labels.
It imports nothing of the package and nothing of transformers (it calls the tokenizer it is given).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

Messages = list[dict[str, Any]]


def is_chat(value: Any) -> bool:
    """A non-empty list of ``{"role": ..., "content": ...}`` messages."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def is_chat_row(row: Mapping[str, Any]) -> bool:
    """A conversational row: ``messages``, or a ``prompt`` of messages (with its ``completion``)."""
    return is_chat(row.get("prompt")) or is_chat(row.get("messages"))


def chat_parts(row: Mapping[str, Any]) -> tuple[Messages, Messages | None, dict[str, Any]]:
    """(messages or prompt, completion or ``None``, template arguments) of a conversational row.

    TRL's precedence: a ``prompt`` column makes a prompt-completion row. The template arguments
    are those TRL passes on per row: ``tools`` (a list, or its JSON text) and ``chat_template_kwargs``.
    """
    tools = row.get("tools")
    kwargs: dict[str, Any] = {"tools": json.loads(tools) if isinstance(tools, str) else tools}
    kwargs.update(row.get("chat_template_kwargs") or {})
    if is_chat(row.get("prompt")):
        completion = row.get("completion")
        if not is_chat(completion):
            raise ValueError(
                "a conversational 'prompt' needs a 'completion' column of messages too, e.g. "
                "[{'role': 'assistant', 'content': ...}]"
            )
        return list(row["prompt"]), list(completion), kwargs
    return list(row["messages"]), None, kwargs


def chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]], **template_kwargs: Any) -> list[int]:
    """The token ids of ``messages`` rendered by the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template to render chat messages with; set tokenizer.chat_template "
            "(the one the model was trained with), or pass text"
        )
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True, **template_kwargs)
    return [int(t) for t in out["input_ids"]]


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    completion: Sequence[Mapping[str, Any]] | None = None,
    **template_kwargs: Any,
) -> tuple[list[int], list[bool]]:
    """``(input_ids, trained)``: a conversation's token ids, and which of them carry loss.

    Without ``completion`` every token is trained. With it, ``messages`` is the prompt: the tokens
    that the prompt rendered with the generation prompt shares with the whole conversation carry no
    loss, the rest do. They diverge not necessarily right after the prompt: some templates render a
    prompt alone differently (TRL's ``common_prefix_length``), and the completion starts where
    they diverge.
    """
    if completion is None:
        ids = chat_ids(tokenizer, messages, **template_kwargs)
        return ids, [True] * len(ids)
    prompt_ids = chat_ids(tokenizer, messages, add_generation_prompt=True, **template_kwargs)
    ids = chat_ids(tokenizer, [*messages, *completion], **template_kwargs)
    start = next(
        (i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids))
    )
    return ids, [i >= start for i in range(len(ids))]


def sft_masks(row: Mapping[str, Any]) -> list[bool] | None:
    """Which tokens carry loss in a row TRL tokenized but left the masking to its collator
    (``completion_mask``, ``assistant_masks``: TRL before 1.0), as that collator did with its
    default ``completion_only_loss``: a token carries loss where every mask is 1. ``None`` without
    such masks."""
    masks = [row[k] for k in ("completion_mask", "assistant_masks") if row.get(k) is not None]
    if not masks:
        return None
    return [all(bits) for bits in zip(*masks)]


def template_sha256(tokenizer: Any) -> str | None:
    """A short hash of the tokenizer's chat template (``None`` without one), recorded with the
    cache's documents so that a chat query rendered with another template can be flagged."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template is None:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)  # named templates
    return hashlib.sha256(text.encode()).hexdigest()[:16]
