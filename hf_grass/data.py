"""Turning user datasets into examples and padded batches.

Accepted: a ``datasets.Dataset`` (or any indexable sequence of dicts) with ``input_ids`` (and
optional ``labels``, ``attention_mask``), or with a ``text`` column that a tokenizer turns into
tokens; a plain list of strings; or rows of any other tensor columns (``input``, ``pixel_values``,
...), passed to the model as they are. Causal-LM labels default to the input ids. Rows whose
``labels`` is a scalar (classification, regression) or a float vector (multi-label) are not causal
LM: their token columns are padded, every other column is stacked as it is. A ``label`` or
``label_ids`` column is read as ``labels``, as the Trainer's collators do. Chat rows (``messages``,
or conversational ``prompt`` and ``completion``) are rendered with the chat template as TRL's
``SFTTrainer`` renders them (``hf_grass.chat``); rows TRL already tokenized are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Sequence
from typing import Any

import torch

from hf_grass.chat import chat_parts, encode_chat, is_chat_row, sft_masks, template_sha256

# the label of tokens without loss (transformers' and PyTorch's convention)
IGNORE_INDEX = -100

logger = logging.getLogger("transformers.hf_grass")

_META_KEYS = ("text", "id", "index")


class ExampleSource:
    """Random access to tokenized examples, with stable indices ``0 .. len-1``.

    Args:
        dataset: the examples (see module docstring).
        tokenizer: needed for text rows and to decode token ids back to text for display.
        max_length: longer sequences are truncated to this many tokens (with one warning).
        text_column: the column holding raw text.
        model_inputs: the argument names of the model's forward; columns of non-causal-LM rows
            that the forward does not take are left out, as the Trainer's
            ``remove_unused_columns`` does (``None``: keep every column).
        prefix: the special token ids the documents of a cache begin with
            (``GradientCache.document_store.prefix``); text rows then begin with them instead of the
            tokenizer's own leading special tokens (``encode_text``). ``None``: as the tokenizer adds.
    """

    def __init__(
        self,
        dataset: Any,
        tokenizer: Any = None,
        max_length: int | None = None,
        text_column: str = "text",
        model_inputs: Collection[str] | None = None,
        prefix: Sequence[int] | None = None,
    ):
        if dataset is None:
            raise ValueError(
                "no dataset given: pass a datasets.Dataset, a list of dicts or a list of strings"
            )
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"the dataset must support len() and indexing (a datasets.Dataset or a list); got {type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: there is nothing to attribute")
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_column = text_column
        self.model_inputs = None if model_inputs is None else frozenset(model_inputs)
        self.prefix = None if prefix is None else [int(t) for t in prefix]
        self._special: frozenset[int] | None = None
        self._own_prefix: list[int] | None = None
        self.truncated = 0
        self._warned = False

    def __len__(self) -> int:
        return len(self.dataset)

    def raw(self, index: int) -> dict[str, Any]:
        row = self.dataset[index]
        if isinstance(row, str):
            return {self.text_column: row}
        if not isinstance(row, dict):
            raise TypeError(f"example {index} is a {type(row).__name__}; expected a dict or a string")
        return dict(row)

    def example(self, index: int) -> dict[str, Any]:
        """The tokenized example: model columns plus ``text``/``id`` metadata."""
        row = _labels_alias(self.raw(index))
        meta = (*_META_KEYS, self.text_column)
        # columns the model takes besides labels (all of them when its forward is not known)
        inputs = [
            k
            for k in row
            if k not in meta and k != "labels" and (self.model_inputs is None or k in self.model_inputs)
        ]
        out: dict[str, Any] = {}
        if "seq_lengths" in row:
            raise ValueError(
                f"example {index} packs several documents into one row (a 'seq_lengths' column, as TRL's "
                "packing=True makes), but attribution scores one document per row: build the cache over "
                "the unpacked dataset (trainer.build_gradient_cache(dataset=...)), or train unpacked"
            )
        if "input_ids" in row:
            out.update({k: v for k, v in row.items() if k not in _META_KEYS})
            trained = sft_masks(out) if "labels" not in out else None  # masks left to TRL's collator
            if trained is not None:
                out["labels"] = [int(t) if m else IGNORE_INDEX for t, m in zip(out["input_ids"], trained)]
            if not is_lm_example(out):  # classification etc.: every column is stacked, keep inputs only
                out = {k: v for k, v in out.items() if k in inputs or k == "labels"}
        elif is_chat_row(row):  # rendered with the chat template, as TRL's SFTTrainer does
            if self.tokenizer is None:
                raise ValueError(f"example {index} holds chat messages but no tokenizer was given to render")
            messages, completion, template_kwargs = chat_parts(row)
            ids, trained = encode_chat(self.tokenizer, messages, completion, **template_kwargs)
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, trained)]
            if self.prefix is not None:  # a query: it begins as the documents did
                ids, labels = begin_like(ids, labels, self.prefix, self.special_ids or frozenset())
            out.update(input_ids=ids, labels=labels)
        elif self.text_column in row and (self.model_inputs is None or not inputs):
            if self.tokenizer is None:
                raise ValueError(
                    f"example {index} has a {self.text_column!r} column but no tokenizer was given to tokenize it"
                )
            text = row[self.text_column]
            if not isinstance(text, str):
                raise TypeError(f"example {index}: column {self.text_column!r} must hold strings")
            if self.prefix is not None and self._own_prefix is None:
                self._own_prefix = tokenizer_prefix(self.tokenizer)
            out["input_ids"] = encode_text(self.tokenizer, text, self.prefix, self._own_prefix)
            if "labels" in row:
                out["labels"] = row["labels"]
        elif inputs:  # tensor columns (features, pixel_values, ...), passed through as they are
            out.update({k: row[k] for k in inputs})
            if "labels" in row:
                out["labels"] = row["labels"]
        else:
            takes = (
                f" or a column the model's forward takes ({sorted(self.model_inputs)})"
                if self.model_inputs
                else ""
            )
            raise ValueError(
                f"example {index} has no model input: neither 'input_ids', a {self.text_column!r} column{takes} "
                f"(columns: {sorted(row)})"
            )
        ids = out.get("input_ids")
        if _is_int_vector(ids) and self.max_length is not None and len(ids) > self.max_length:
            self.truncated += 1
            if not self._warned:
                logger.warning(
                    "Example %d has %d tokens, more than max_length=%d: truncating it (and any other long "
                    "example; the count is recorded in the manifest).",
                    index,
                    len(ids),
                    self.max_length,
                )
                self._warned = True
            for key in ("input_ids", "labels", "attention_mask"):
                if key in out and _is_int_vector(out[key]):
                    out[key] = list(out[key])[: self.max_length]
        out["text"] = self.text(index, row, out)
        if "id" in row:
            out["id"] = row["id"]
        return out

    def text(self, index: int, row: dict[str, Any], tokenized: dict[str, Any]) -> str | None:
        if isinstance(row.get(self.text_column), str):
            return row[self.text_column]
        ids = tokenized.get("input_ids")
        if self.tokenizer is not None and _is_int_vector(ids):
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return None

    @property
    def special_ids(self) -> frozenset[int] | None:
        """The tokenizer's special token ids (``None`` without a tokenizer)."""
        if self._special is None and self.tokenizer is not None:
            self._special = special_ids(self.tokenizer)
        return self._special

    def leading_special(self, example: dict[str, Any]) -> list[int] | None:
        """The special token ids an example's tokens begin with (``None``: not known, e.g. no
        tokenizer or no token ids)."""
        ids, specials = example.get("input_ids"), self.special_ids
        if specials is None or not _is_int_vector(ids):
            return None
        return leading_special(ids, specials)

    def fingerprint(self) -> str:
        """A cheap content hash (size and three examples) to refuse resuming on other data."""
        n = len(self)
        probe = sorted({0, n // 2, n - 1})
        blob = json.dumps(
            [n] + [_jsonable({k: v for k, v in self.example(i).items() if k != "text"}) for i in probe],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- how documents begin (the manifest's "documents" record; queries are encoded the same way) ----


def special_ids(tokenizer: Any) -> frozenset[int]:
    """Every special token id of a tokenizer (named ones and added tokens marked special)."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, token in added.items() if getattr(token, "special", False)}
    return frozenset(ids)


def leading_special(ids: Sequence[int] | torch.Tensor, specials: Collection[int]) -> list[int]:
    """The run of special token ids that ``ids`` begins with."""
    out = []
    for token in ids:
        token = int(token)
        if token not in specials:
            break
        out.append(token)
    return out


def tokenizer_prefix(tokenizer: Any) -> list[int]:
    """The token ids the tokenizer puts in front of a text itself (Llama: BOS; GPT-2: none)."""
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    return leading_special(full, special_ids(tokenizer))


def chat_prefix(tokenizer: Any) -> list[int] | None:
    """The special token ids the tokenizer's chat template begins a conversation with (``None``
    without a template, or when it cannot be rendered)."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception:  # a template that needs other roles or variables: we cannot tell
        return None
    return leading_special(ids, special_ids(tokenizer))


def document_encoding(tokenizer: Any) -> dict[str, Any]:
    """What the manifest records about the tokenizer's own encoding; the pass adds the documents'
    shared prefix per shard and the manifest merge the rest (``cache.manifest.merge_parts``).
    ``chat_template_sha256`` names the chat template chat rows were rendered with."""
    if tokenizer is None:
        return {"tokenizer_prefix": None, "chat_prefix": None, "chat_template_sha256": None}
    return {
        "tokenizer_prefix": tokenizer_prefix(tokenizer),
        "chat_prefix": chat_prefix(tokenizer),
        "chat_template_sha256": template_sha256(tokenizer),
    }


def begin_like(
    ids: list[int], labels: list[int], prefix: Sequence[int], specials: Collection[int]
) -> tuple[list[int], list[int]]:
    """A rendered chat holds its template's special tokens: the documents' ``prefix`` goes in front
    (without loss) only when the rendering begins with no special token at all."""
    prefix = [int(t) for t in prefix]
    if not prefix or ids[: len(prefix)] == prefix or leading_special(ids, specials):
        return ids, labels
    return prefix + ids, [IGNORE_INDEX] * len(prefix) + labels


def encode_text(
    tokenizer: Any, text: str, prefix: Sequence[int] | None = None, own_prefix: Sequence[int] | None = None
) -> list[int]:
    """Token ids of ``text`` as the tokenizer encodes it (with its special tokens), except that with
    ``prefix`` the text begins with exactly those ids instead of the tokenizer's own leading ones
    (``own_prefix``, default ``tokenizer_prefix``): documents that begin with ``<eos>`` give queries
    that begin with it, and a tokenizer that adds ``<bos>`` itself does not get it twice."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if prefix is None:
        return ids
    own = list(tokenizer_prefix(tokenizer) if own_prefix is None else own_prefix)
    if own and ids[: len(own)] == own:
        ids = ids[len(own) :]
    return [int(t) for t in prefix] + ids


def _labels_alias(row: dict[str, Any]) -> dict[str, Any]:
    """``label`` / ``label_ids`` read as ``labels`` (what transformers' data collators do)."""
    if "labels" not in row:
        for alias in ("label", "label_ids"):
            if alias in row:
                row["labels"] = row.pop(alias)
                break
    return row


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) or type(obj).__module__ == "numpy":
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _is_int_vector(value: Any) -> bool:
    """A 1-D sequence of integers (token ids or token labels), not floats and not a scalar."""
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        return value.ndim == 1 and not torch.as_tensor(value).is_floating_point()
    return isinstance(value, (list, tuple)) and (len(value) == 0 or not isinstance(value[0], float))


def is_lm_example(example: dict[str, Any]) -> bool:
    """A causal-LM example: token ids with no labels or with one label per token."""
    if "input_ids" not in example:
        return False
    labels = example.get("labels")
    return labels is None or _is_int_vector(labels)


def collate(
    examples: Sequence[dict[str, Any]], pad_token_id: int | None = 0, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad causal-LM examples (labels default to input ids, pads get -100 and mask 0); for other
    examples pad the token columns (``input_ids`` with the pad token, its mask with 0) and stack the
    rest."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not is_lm_example(examples[0]):
        return _collate_other(examples, pad_token_id, padding_side)
    pad = 0 if pad_token_id is None else int(pad_token_id)
    width = max(len(ex["input_ids"]) for ex in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad, dtype=torch.long),
        "attention_mask": torch.zeros(len(examples), width, dtype=torch.long),
        "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
    }
    for row, ex in enumerate(examples):
        ids = torch.as_tensor(list(ex["input_ids"]), dtype=torch.long)
        labels = (
            torch.as_tensor(list(ex["labels"]), dtype=torch.long) if ex.get("labels") is not None else ids
        )
        mask = (
            torch.as_tensor(list(ex["attention_mask"]), dtype=torch.long)
            if ex.get("attention_mask") is not None
            else torch.ones_like(ids)
        )
        if labels.shape != ids.shape or mask.shape != ids.shape:
            raise ValueError("input_ids, labels and attention_mask of an example must have the same length")
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
        batch["input_ids"][row, span] = ids
        batch["attention_mask"][row, span] = mask
        batch["labels"][row, span] = labels
    return batch


def _collate_other(
    examples: Sequence[dict[str, Any]], pad_token_id: int | None, padding_side: str
) -> dict[str, torch.Tensor]:
    """Classification, regression and tensor-column batches."""
    # strings (names, sources) cannot become tensors; a model cannot take them either
    keys = [k for k in examples[0] if k not in _META_KEYS and not isinstance(examples[0][k], str)]
    batch: dict[str, torch.Tensor] = {}
    tokens = "input_ids" in keys and all(_is_int_vector(ex["input_ids"]) for ex in examples)
    if tokens:  # sequence classification: pad like the LM path, mask 0 on pads
        ids = [torch.as_tensor(ex["input_ids"], dtype=torch.long) for ex in examples]
        width = max(len(t) for t in ids)
        masks = [
            torch.as_tensor(ex["attention_mask"], dtype=torch.long)
            if ex.get("attention_mask") is not None
            else torch.ones_like(t)
            for ex, t in zip(examples, ids)
        ]
        fill = {"input_ids": 0 if pad_token_id is None else int(pad_token_id)}
        columns = {"input_ids": ids, "attention_mask": masks}
        if "token_type_ids" in keys:
            columns["token_type_ids"] = [
                torch.as_tensor(ex["token_type_ids"], dtype=torch.long) for ex in examples
            ]
        for key, values in columns.items():
            out = torch.full((len(examples), width), fill.get(key, 0), dtype=torch.long)
            for row, v in enumerate(values):
                if v.shape != ids[row].shape:
                    raise ValueError(f"{key} and input_ids of an example must have the same length")
                span = slice(width - len(v), width) if padding_side == "left" else slice(0, len(v))
                out[row, span] = v
            batch[key] = out
    for key in keys:
        if key not in batch:
            batch[key] = torch.stack([torch.as_tensor(ex[key]) for ex in examples])
    return batch


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its EOS token, else 0 (pads carry no loss either way)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0


def padding_side(tokenizer: Any) -> str:
    side = getattr(tokenizer, "padding_side", "right") if tokenizer is not None else "right"
    return side if side in ("left", "right") else "right"


def padded_batches(source: ExampleSource, tokenizer: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches of a (small) query set, in order."""
    examples = [source.example(i) for i in range(len(source))]
    return [
        collate(examples[i : i + batch_size], pad_token_id(tokenizer), padding_side(tokenizer))
        for i in range(0, len(examples), batch_size)
    ]
