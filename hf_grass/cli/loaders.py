"""Loading what the commands take: models and tokenizers, datasets, caches."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_grass.cli.common import UsageError, default_device, positive_int, status

if TYPE_CHECKING:
    from hf_grass.cache.reader import GradientCache

_MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=required,
        help="local directory or Hub id of a causal LM (AutoModelForCausalLM.from_pretrained)"
        + ("" if required else "; default: the model recorded in the cache's manifest"),
    )
    g.add_argument("--tokenizer", help="local directory or Hub id of the tokenizer (default: --model)")
    g.add_argument("--revision", help="model revision (branch, tag or commit) on the Hub")
    g.add_argument("--gguf-file", help="GGUF file inside --model, passed to from_pretrained(gguf_file=...)")
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow custom model code from the repo (off by default)",
    )
    g.add_argument(
        "--model-dtype",
        choices=_MODEL_DTYPES,
        default="float32",
        help="dtype to load the weights in (default: float32, the most accurate gradients; "
        "'auto' keeps the checkpoint's)",
    )
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def add_dataset_arguments(p: argparse.ArgumentParser, what: str = "the training documents") -> None:
    g = p.add_argument_group("dataset")
    g.add_argument(
        "--dataset",
        required=True,
        help=f"{what}: a .jsonl/.json/.csv/.parquet file, a directory saved with datasets' save_to_disk, "
        "a data directory, or a Hub dataset id (datasets.load_dataset)",
    )
    g.add_argument("--split", default="train", help="split of a Hub dataset or DatasetDict (default: train)")
    g.add_argument("--text-column", default="text", help="column holding the documents (default: text)")
    g.add_argument("--max-examples", type=positive_int, help="only the first N examples")


def dataset_from_args(args: argparse.Namespace) -> Any:
    """The dataset ``add_dataset_arguments`` describes."""
    return load_text_dataset(args.dataset, args.split, args.text_column, args.max_examples)


def model_from_args(args: argparse.Namespace, cache: GradientCache | None = None) -> tuple[Any, Any]:
    """The model and tokenizer of ``add_model_arguments`` (default: the model ``cache`` records)."""
    model_spec = args.model or (cache.model_info.get("name_or_path") if cache is not None else None)
    if not model_spec:
        raise UsageError(f"the cache {args.cache} does not record which model built it; give it with --model")
    return load_model_and_tokenizer(
        model_spec,
        args.tokenizer,
        dtype=args.model_dtype,
        device=args.device,
        gguf_file=args.gguf_file,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
    )


def load_model_and_tokenizer(
    model_spec: str,
    tokenizer_spec: str | None = None,
    *,
    dtype: str = "float32",
    device: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local directory or a Hub id."""
    from hf_grass.cache.hub import is_local

    for spec, what in ((model_spec, "model"), (tokenizer_spec, "tokenizer")):
        if spec and is_local(spec, bare_names_are_repos=True) and not Path(spec).expanduser().exists():
            raise UsageError(f"{what} directory {spec!r} does not exist")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        common["revision"] = revision
    if gguf_file:
        common["gguf_file"] = gguf_file
    model_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
    path = str(Path(model_spec).expanduser()) if is_local(model_spec, True) else model_spec
    status(f"Loading model {model_spec} ...")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype, **common)
    tok_path = tokenizer_spec or path
    tok_kwargs = common if tokenizer_spec is None else {"trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(
        str(Path(tok_path).expanduser()) if is_local(tok_path, True) else tok_path, **tok_kwargs
    )
    model.to(device or default_device())
    return model, tokenizer


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (or of a JSON array); a row that is a string becomes ``{"text": ...}``."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} is not valid JSON: {err}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UsageError(f"line {number} of {path} is not valid JSON: {err}") from None
    out = []
    for number, row in enumerate(rows, 1):
        if isinstance(row, str):
            row = {"text": row}
        if not isinstance(row, dict):
            raise UsageError(f"row {number} of {path} is a {type(row).__name__}; expected an object")
        out.append(row)
    if not out:
        raise UsageError(f"{path} holds no rows")
    return out


def load_text_dataset(
    spec: str, split: str = "train", text_column: str = "text", max_examples: int | None = None
) -> Any:
    """A dataset from a JSONL/JSON/CSV/Parquet file, a ``save_to_disk`` directory, a data
    directory, or a Hub dataset id; its text column is renamed to ``text`` (what hf-grass reads)."""
    from hf_grass.cache.hub import is_local

    path = Path(spec).expanduser()
    dataset: Any
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            dataset = read_jsonl(path)
        elif suffix in (".csv", ".parquet"):
            from datasets import load_dataset

            dataset = load_dataset(suffix[1:], data_files=str(path), split="train")
        else:
            raise UsageError(f"dataset file {spec!r}: expected a .jsonl, .json, .csv or .parquet file")
    elif path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            from datasets import DatasetDict, load_from_disk

            dataset = load_from_disk(str(path))
            if isinstance(dataset, DatasetDict):
                if split not in dataset:
                    raise UsageError(f"{spec} has splits {sorted(dataset)}; pick one with --split")
                dataset = dataset[split]
        else:
            from datasets import load_dataset

            dataset = load_dataset(str(path), split=split)
    elif is_local(spec, bare_names_are_repos=True):
        raise UsageError(f"dataset {spec!r} does not exist")
    else:
        from datasets import load_dataset

        status(f"Loading dataset {spec} (split {split}) from the Hub ...")
        dataset = load_dataset(spec, split=split)
    return _select_text(dataset, spec, text_column, max_examples)


def _select_text(dataset: Any, spec: str, text_column: str, max_examples: int | None) -> Any:
    if isinstance(dataset, list):
        columns = set().union(*(row.keys() for row in dataset[:1000]))
    else:
        columns = set(dataset.column_names)
    if text_column not in columns and "input_ids" not in columns:
        raise UsageError(
            f"dataset {spec!r} has no {text_column!r} column (columns: {', '.join(sorted(columns))}); "
            "choose one with --text-column"
        )
    if max_examples is not None:
        dataset = (
            dataset[:max_examples]
            if isinstance(dataset, list)
            else dataset.select(range(min(max_examples, len(dataset))))
        )
    if text_column != "text" and text_column in columns:
        if isinstance(dataset, list):
            dataset = [
                {**{k: v for k, v in row.items() if k != "text"}, "text": row.get(text_column)}
                for row in dataset
            ]
        else:
            if "text" in columns:
                dataset = dataset.remove_columns("text")
            dataset = dataset.rename_column(text_column, "text")
    if len(dataset) == 0:
        raise UsageError(f"dataset {spec!r} is empty")
    return dataset


def open_cache_arg(spec: str, verify: bool = True, lazy: bool = False) -> GradientCache:
    """``open_cache`` of a command-line argument: a local folder that is not a cache is a usage
    error; a Hub repo id is downloaded. Both are checked the same way."""
    from hf_grass.cache.hub import is_local
    from hf_grass.cache.reader import open_cache

    if is_local(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise UsageError(f"no gradient cache at {spec!r}: the directory does not exist")
        if not (path / "manifest.json").is_file():
            hint = " (an unfinished build: run it again to finish)" if (path / "parts").is_dir() else ""
            raise UsageError(f"{spec!r} is not a gradient cache: it has no manifest.json{hint}")
        if lazy:
            raise UsageError("--lazy applies to a Hub repo id; a local cache is read where it is")
        return open_cache(path, verify=verify)
    status(f"Fetching gradient cache {spec} from the Hub{' (shards on demand)' if lazy else ''} ...")
    return open_cache(spec, verify=verify, lazy=lazy)
