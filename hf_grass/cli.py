"""The ``hf-grass`` command line.

::

    hf-grass demo                          train a tiny model on a shipped corpus and explain it (offline)
    hf-grass build  --model M --dataset D  attribution pass over a dataset -> gradient cache
    hf-grass query  --cache C --prompt P   the training documents behind the model's completion of P
    hf-grass info   CACHE                  what a cache holds (--verify checks every checksum)
    hf-grass push   CACHE REPO_ID          upload a cache to a Hub dataset repo
    hf-grass pull   REPO_ID                download (and verify) a cache from the Hub

Exit codes: 0 success; **2 usage error**: an invalid option or value (including an invalid
``GraSSConfig`` combination), or an input given on the command line that does not exist or is not
what it should be (a missing file, a directory that is not a gradient cache); **1 runtime
failure**: the inputs exist but the work failed (a damaged cache, a model that does not match its
cache, a Hub or model-loading error, a numerical problem); 130 interrupted. Expected errors print
one message on stderr and no traceback; ``--debug`` shows the traceback.

Heavy libraries (torch, transformers, datasets) are imported inside the commands, so ``--help`` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_grass import __version__
from hf_grass.config import COMPRESSORS, DTYPES, PRECONDITIONERS, GraSSConfig

if TYPE_CHECKING:
    import torch

    from hf_grass.cache.reader import GradientCache
    from hf_grass.query import InfluenceResult, InfluentialDocument

PROG = "hf-grass"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# choices of the GraSSConfig fields that take one of a few strings (argparse checks them)
_CONFIG_CHOICES: dict[str, Sequence[str]] = {
    "compressor": COMPRESSORS,
    "distribution": ("gaussian", "rademacher"),
    "dtype": DTYPES,
    "loss_reduction": ("sum", "mean"),
    "preconditioner": PRECONDITIONERS,
}
# a --target-modules / --exclude-modules value holding one of these is a regex, not a module name
_REGEX_CHARS = re.compile(r"[*+?\[\](){}|^$\\]")
_MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(Exception):
    """A problem with the command line itself: reported as a usage error (exit code 2)."""


# =================================================================================================
# small helpers
# =================================================================================================


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # unreachable


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _status(message: str) -> None:
    """Progress notes go to stderr, so stdout stays clean for tables and ``--json``."""
    print(message, file=sys.stderr, flush=True)


def _looks_like_path(spec: str) -> bool:
    """Whether a model/dataset/cache argument is meant as a local path rather than a Hub id.

    Hub ids are ``name`` or ``namespace/name``; anything anchored (``/``, ``./``, ``~``), with more
    than one slash, or with a file suffix is a path, so a typo in a path is reported as a missing
    file instead of being sent to the Hub.
    """
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
        or bool(re.search(r"\.(jsonl?|txt|csv|parquet|arrow|safetensors|gguf|bin)$", spec))
    )


def _existing_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{what} {path!r} does not exist")
    if not p.is_file():
        raise UsageError(f"{what} {path!r} is not a file")
    return p


def _check_output_file(path: str, what: str) -> Path:
    """An output file whose directory exists (checked before any long computation)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{what} {path!r} is a directory; give a file name such as scores.png")
    if not p.parent.exists():
        raise UsageError(f"the directory of {what} {path!r} does not exist")
    return p


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# =================================================================================================
# GraSSConfig <-> command-line flags
# =================================================================================================


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``GraSSConfig`` field, with the field's help text and default.

    Every flag defaults to ``argparse.SUPPRESS``: only the flags given reach ``GraSSConfig``, so its
    own defaults (and its validation) stay the single source of truth.
    """
    group = parser.add_argument_group(
        "attribution configuration (GraSSConfig; every field, same names and defaults)"
    )
    hints = typing.get_type_hints(GraSSConfig)
    for f in dataclasses.fields(GraSSConfig):
        help_text = f.metadata.get("help", "").replace("%", "%%")
        default = "auto" if f.default is None else f.default
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        hint = hints[f.name]
        args = typing.get_args(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name in ("target_modules", "exclude_modules"):
            kwargs.update(nargs="+", metavar="NAME")
            help_text += " Here: several names, or one value with regex characters (*+?[](){}|^$\\)."
        else:
            base = next((a for a in args if a is not type(None)), hint)
            kwargs["type"] = _positive_int if base is int and f.name != "seed" else base
            if f.name in _CONFIG_CHOICES:
                kwargs["choices"] = list(_CONFIG_CHOICES[f.name])
            kwargs["metavar"] = f.name.upper() if "choices" not in kwargs else None
        if "Default:" not in help_text:  # some help texts already explain their default
            help_text += f" (default: {default})"
        group.add_argument(_flag(f.name), help=help_text, **kwargs)


def _module_spec(values: list[str] | None) -> list[str] | str | None:
    """``--target-modules a b`` -> a list of names; one value with regex characters -> a regex."""
    if values is None:
        return None
    if len(values) == 1 and _REGEX_CHARS.search(values[0]):
        try:
            re.compile(values[0])
        except re.error as err:
            raise UsageError(f"invalid regular expression {values[0]!r}: {err}") from None
        return values[0]
    return list(values)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> GraSSConfig:
    """The ``GraSSConfig`` of the flags given; its validation errors are usage errors."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GraSSConfig) if hasattr(args, f.name)}
    for name in ("target_modules", "exclude_modules"):
        if name in values:
            values[name] = _module_spec(values[name])
    values.update(overrides)
    try:
        return GraSSConfig(**values)
    except (ValueError, TypeError) as err:
        raise UsageError(f"invalid configuration: {err}") from None


# =================================================================================================
# loading models, tokenizers, datasets and caches
# =================================================================================================


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
    for spec, what in ((model_spec, "model"), (tokenizer_spec, "tokenizer")):
        if spec and _looks_like_path(spec) and not Path(spec).expanduser().exists():
            raise UsageError(f"{what} directory {spec!r} does not exist")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        common["revision"] = revision
    if gguf_file:
        common["gguf_file"] = gguf_file
    model_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
    path = str(Path(model_spec).expanduser()) if _looks_like_path(model_spec) else model_spec
    _status(f"Loading model {model_spec} ...")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype, **common)
    tok_path = tokenizer_spec or path
    tok_kwargs = common if tokenizer_spec is None else {"trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(
        str(Path(tok_path).expanduser()) if _looks_like_path(tok_path) else tok_path, **tok_kwargs
    )
    model.to(device or _default_device())
    return model, tokenizer


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
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
    path = Path(spec).expanduser()
    dataset: Any
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            dataset = _read_jsonl(path)
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
    elif _looks_like_path(spec):
        raise UsageError(f"dataset {spec!r} does not exist")
    else:
        from datasets import load_dataset

        _status(f"Loading dataset {spec} (split {split}) from the Hub ...")
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


def open_cache_arg(spec: str, **kwargs: Any) -> GradientCache:
    """A cache from a local directory (checked here, so a wrong path is a usage error) or a Hub id."""
    from hf_grass.cache.hub import is_repo_id
    from hf_grass.query import open_cache

    path = Path(spec).expanduser()
    if path.exists() or _looks_like_path(spec) or not is_repo_id(spec):
        if not path.is_dir():
            raise UsageError(f"no gradient cache at {spec!r}: the directory does not exist")
        if not (path / "manifest.json").is_file():
            hint = " (an unfinished build: run it again to finish)" if (path / "parts").is_dir() else ""
            raise UsageError(f"{spec!r} is not a gradient cache: it has no manifest.json{hint}")
        from hf_grass.cache.reader import GradientCache

        return GradientCache(path, **kwargs)
    _status(f"Fetching gradient cache {spec} from the Hub ...")
    return open_cache(spec)


def _count_tokens(dataset: Any, tokenizer: Any, max_length: int | None) -> int | None:
    """Tokens the pass read (for the throughput line); None when they cannot be counted cheaply."""
    try:
        total = 0
        n = len(dataset)
        for start in range(0, n, 1000):
            rows = dataset[start : start + 1000]
            if isinstance(rows, dict):  # a datasets.Dataset slice is a dict of columns
                ids = rows.get("input_ids")
                texts = rows.get("text")
            else:
                ids = [r["input_ids"] for r in rows] if "input_ids" in rows[0] else None
                texts = [r.get("text") for r in rows]
            if ids is None:
                ids = tokenizer(list(texts))["input_ids"]
            total += sum(min(len(x), max_length or len(x)) for x in ids)
        return total
    except Exception:  # a statistic must never fail the build
        return None


# =================================================================================================
# output: tables and plots
# =================================================================================================

SCORE_LEGEND = (
    "score > 0  helpful: upweighting the document in training would lower the loss of this completion\n"
    "score < 0  harmful: upweighting it would raise that loss (it pushes towards another answer)"
)


def format_score(score: float) -> str:
    """Signed, without an exponent for the usual magnitudes (scores are dot products: their scale
    depends on the model and the preconditioner, cosine scores lie in [-1, 1])."""
    mag = abs(score)
    if mag == 0 or not math.isfinite(score):
        return f"{score:+g}"
    if mag >= 1e7 or mag < 1e-4:
        return f"{score:+.3e}"
    if mag >= 100:
        return f"{score:+.0f}"
    if mag >= 1:
        return f"{score:+.2f}"
    return f"{score:+.4f}"


def _snippet(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: max(width - 3, 1)] + "..."


def format_documents(docs: Sequence[InfluentialDocument], width: int | None = None) -> list[str]:
    """Rows ``rank  score  index  [id]  text`` fitted to the terminal width."""
    width = width or shutil.get_terminal_size((110, 24)).columns
    ids = [("" if d.id is None else str(d.id)) for d in docs]
    id_width = min(max((len(i) for i in ids), default=0), 30)
    head = f"  {'rank':>4}  {'score':>10}  {'index':>7}  " + (f"{'id':<{id_width}}  " if id_width else "")
    text_width = max(width - len(head), 20)
    lines = [head + "text"]
    for rank, (d, doc_id) in enumerate(zip(docs, ids), 1):
        row = f"  {rank:>4}  {format_score(d.score):>10}  {d.index:>7}  "
        if id_width:
            row += f"{_snippet(doc_id, id_width):<{id_width}}  "
        lines.append(row + _snippet(d.text, text_width))
    return lines


def format_result(result: InfluenceResult, width: int | None = None) -> str:
    lines = [f"Prompt:     {result.prompt!r}", f"Completion: {result.completion!r}", ""]
    lines += ["Most helpful training documents:"] + format_documents(result.documents, width)
    if result.harmful:
        lines += ["", "Most harmful training documents:"] + format_documents(result.harmful, width)
    return "\n".join(lines)


MAX_PLOT_PANELS = 12


def plot_scores(path: Path, panels: Sequence[tuple[InfluenceResult, torch.Tensor]], label: int = 5) -> None:
    """A PNG with, per query, the histogram of its scores over the whole cache, the top helpful
    (green) and harmful (red) documents marked and labelled by dataset index."""
    Figure, FigureCanvasAgg = _matplotlib()
    if len(panels) > MAX_PLOT_PANELS:  # one figure stays readable; the tables have every prompt
        _status(f"Plotting the first {MAX_PLOT_PANELS} of {len(panels)} prompts.")
        panels = panels[:MAX_PLOT_PANELS]
    fig = Figure(figsize=(9, 2.9 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: no display or pyplot state needed
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (result, scores) in zip(axes, panels):
        values = scores.double().numpy()
        ax.hist(values, bins=min(80, max(10, len(values) // 4)), color="0.65", log=True)
        ax.axvline(0.0, color="0.3", linewidth=0.8)
        ymax = ax.get_ylim()[1]
        for docs, color in ((result.documents, "tab:green"), (result.harmful, "tab:red")):
            for rank, d in enumerate(docs):
                ax.axvline(d.score, color=color, linewidth=1.2, alpha=0.8)
                if rank < label:  # label the first few; the rest are marked only
                    ax.annotate(
                        f"#{d.index}",
                        (d.score, ymax),
                        xytext=(2, -4 - 11 * rank),
                        textcoords="offset points",
                        color=color,
                        fontsize=8,
                        va="top",
                    )
        title = f"{_snippet(result.prompt, 60)!r} -> {_snippet(result.completion, 40)!r}"
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("documents")
    axes[-1].set_xlabel("influence score (> 0 helpful: green, < 0 harmful: red); labels are dataset indices")
    fig.savefig(path, dpi=120)


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed: pip install 'hf-grass[plot]'"
        ) from None
    return Figure, FigureCanvasAgg


# =================================================================================================
# commands
# =================================================================================================


def cmd_build(args: argparse.Namespace) -> int:
    """Attribution pass over a dataset -> gradient cache, with a progress bar and a summary."""
    config = config_from_args(args)
    dataset = load_text_dataset(args.dataset, args.split, args.text_column, args.max_examples)
    model, tokenizer = load_model_and_tokenizer(
        args.model,
        args.tokenizer,
        dtype=args.model_dtype,
        device=args.device,
        gguf_file=args.gguf_file,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
    )
    from hf_grass.capture.engine import context_length
    from hf_grass.pipeline import run_attribution_pass

    cache_dir = Path(config.cache_dir).expanduser()
    resumed = (cache_dir / "manifest.json").is_file() or (cache_dir / "parts").is_dir()
    _status(
        f"Attribution pass: {len(dataset)} examples, {config.compressor} proj_dim={config.proj_dim}, "
        f"preconditioner={config.preconditioner}, into {cache_dir}" + (" (resuming)" if resumed else "")
    )
    start = time.perf_counter()
    cache = run_attribution_pass(
        model,
        dataset,
        config,
        tokenizer,
        cache_dir=cache_dir,
        device=next(model.parameters()).device,
        disable_progress=args.no_progress,
        verify_existing=args.verify,
    )
    elapsed = time.perf_counter() - start
    tokens = _count_tokens(dataset, tokenizer, config.max_length or context_length(model))
    s = cache.summary()
    per_module = sorted({m["dim"] for m in cache.modules})
    print(f"Gradient cache written to {cache.path}" + (" (resumed)" if resumed else ""))
    print(
        f"  rows        {s['rows']} of {s['examples']} examples "
        f"({s['skipped']} skipped, {s['truncated']} truncated)"
    )
    print(
        f"  dimension   {s['dim']} per row = {s['modules']} modules x "
        f"{'/'.join(map(str, per_module))} ({s['compressor']}, preconditioner {s['preconditioner']})"
    )
    print(
        f"  on disk     {s['shards']} shard(s) of up to {config.shard_size} rows, {s['dtype']}, "
        f"{_human_bytes(_dir_bytes(cache.path))}"
    )
    line = f"  time        {elapsed:.1f} s"
    if tokens:
        line += f", {tokens:,} tokens ({tokens / max(elapsed, 1e-9):,.0f} tokens/s)"
    print(line)
    print(f"Next: {PROG} query --cache {cache.path} --prompt '...'")
    return EXIT_OK


def _read_prompts(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(prompt, completion) pairs from --prompt and --prompts-file."""
    pairs: list[tuple[str, str | None]] = [(p, args.completion) for p in args.prompt or []]
    if args.prompts_file:
        path = _existing_file(args.prompts_file, "prompts file")
        if path.suffix.lower() in (".jsonl", ".json"):
            for number, row in enumerate(_read_jsonl(path), 1):
                if not isinstance(row.get("prompt"), str):
                    raise UsageError(f"row {number} of {path} has no string 'prompt' field")
                pairs.append((row["prompt"], row.get("completion", args.completion)))
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            pairs += [(line, args.completion) for line in lines if line.strip()]
    if not pairs:
        raise UsageError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    for prompt, _ in pairs:
        if not prompt.strip():
            raise UsageError("a prompt is empty: give the text whose completion you want to explain")
    return pairs


def cmd_query(args: argparse.Namespace) -> int:
    """Top-k helpful and harmful training documents for each prompt, as tables or JSON."""
    pairs = _read_prompts(args)
    plot_path = _check_output_file(args.plot, "--plot") if args.plot else None
    if plot_path is not None:
        _matplotlib()  # fail now, not after the work
    if args.damping is not None and (not math.isfinite(args.damping) or args.damping < 0):
        raise UsageError(f"--damping must be a finite number >= 0, got {args.damping}")
    cache = open_cache_arg(args.cache)
    if args.k > cache.num_rows:
        raise UsageError(f"-k {args.k} exceeds the {cache.num_rows} rows of the cache {args.cache}")
    model_spec = args.model or cache.model_info.get("name_or_path")
    if not model_spec:
        raise UsageError(f"the cache {args.cache} does not record which model built it; give it with --model")
    model, tokenizer = load_model_and_tokenizer(
        model_spec,
        args.tokenizer,
        dtype=args.model_dtype,
        device=args.device,
        gguf_file=args.gguf_file,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
    )
    from hf_grass.query import Attributor

    attributor = Attributor(
        model,
        tokenizer,
        cache,
        preconditioner=args.preconditioner,
        damping=args.damping,
        cosine=args.cosine,
        check_model=not args.no_check_model,
    )
    results, panels = [], []
    for prompt, completion in pairs:
        result = attributor.find_influential(
            prompt,
            k=args.k,
            completion=completion,
            all_scores=plot_path is not None,
            max_new_tokens=args.max_new_tokens,
        )
        results.append(result)
        if result.scores is not None:
            panels.append((result, result.scores))
        if not args.json:
            print(format_result(result) + "\n")
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False))
    else:
        print(SCORE_LEGEND)
    if plot_path is not None:
        plot_scores(plot_path, panels)
        _status(f"Score distribution plotted to {plot_path}")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    """A cache's summary (``GradientCache.summary()``), readable or as JSON; ``--verify`` checks files."""
    cache = open_cache_arg(args.cache)
    summary = cache.summary()
    summary["bytes_on_disk"] = _dir_bytes(cache.path)
    if args.verify:
        cache.verify()  # raises CacheError (exit 1) naming the first bad file
        summary["verified_files"] = len(cache.files())
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    cfg, model = cache.config, summary["model"]
    rows = [
        (
            "rows",
            f"{summary['rows']} of {summary['examples']} examples ({summary['skipped']} skipped, "
            f"{summary['truncated']} truncated), {'complete' if summary['complete'] else 'INCOMPLETE'}",
        ),
        (
            "compressor",
            f"{summary['compressor']}, proj_dim {summary['proj_dim']}, sparsify_factor "
            f"{cfg.sparsify_factor}, seed {summary['seed']}",
        ),
        ("dimension", f"{summary['dim']} per row over {summary['modules']} modules"),
        (
            "scoring",
            f"preconditioner {summary['preconditioner']}, damping {cfg.damping}, "
            f"cosine {'on' if cfg.cosine else 'off'}, loss {cfg.loss_reduction}",
        ),
        (
            "storage",
            f"{summary['dtype']}, {summary['shards']} shard(s) of up to {cfg.shard_size} rows, "
            f"{_human_bytes(summary['bytes_on_disk'])} on disk",
        ),
        ("model", f"{model.get('class')} {model.get('name_or_path') or '(no name recorded)'}"),
        ("weights", f"sha256 {model.get('weights_sha256')} (revision {model.get('revision') or '-'})"),
    ]
    names = cache.module_names
    rows.append(
        ("modules", ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else ""))
    )
    if args.verify:
        rows.append(("verified", f"all {summary['verified_files']} files match their sha256"))
    print(f"Gradient cache {summary['path']}")
    for key, value in rows:
        print(f"  {key:<11} {value}")
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    """Upload a cache to a Hub dataset repo (verified first; one commit)."""
    from hf_grass.cache.hub import is_repo_id

    if not is_repo_id(args.repo_id):
        raise UsageError(f"{args.repo_id!r} is not a Hub repo id; expected namespace/name")
    cache = open_cache_arg(args.cache_dir)
    _status(f"Pushing {cache.num_rows} rows from {cache.path} to the dataset repo {args.repo_id} ...")
    commit = cache.push_to_hub(
        args.repo_id,
        private=args.private,
        token=args.token,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    oid = getattr(commit, "oid", None)
    print(f"Pushed {cache.path} to {args.repo_id}" + (f" (commit {oid[:12]})" if oid else ""))
    print(f"  {commit}")
    print(f"Use it anywhere: {PROG} query --cache {args.repo_id} --prompt '...'")
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a cache from the Hub into a local directory, checking every checksum."""
    from hf_grass.cache.hub import is_repo_id, load_cache

    if not is_repo_id(args.repo_id):
        raise UsageError(f"{args.repo_id!r} is not a Hub repo id; expected namespace/name")
    if Path(args.repo_id).exists():
        raise UsageError(f"{args.repo_id!r} is a local path; pull takes a Hub repo id (namespace/name)")
    _status(f"Pulling {args.repo_id}@{args.revision or 'main'} ...")
    cache = load_cache(
        args.repo_id,
        revision=args.revision,
        token=args.token,
        local_dir=args.local_dir,
        force_download=args.force_download,
    )
    print(
        f"Pulled {args.repo_id}@{args.revision or 'main'} to {cache.path} ({cache.num_rows} rows, verified)"
    )
    print(f"Next: {PROG} info {cache.path}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The offline demo (``hf_grass/demo.py``), imported only when it runs."""
    from hf_grass.demo import cmd_demo as run_demo

    return run_demo(args)


# =================================================================================================
# the parser
# =================================================================================================


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks on errors"
    )
    return common


def _add_model_arguments(p: argparse.ArgumentParser, required: bool) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    from hf_grass.demo import DEMO_EPOCHS  # stdlib-only at import: --help stays instant

    common = _common()
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Training-data attribution for Hugging Face causal LMs (FactGraSS gradient caches). "
        f"Start with '{PROG} demo'.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage error (bad arguments or missing inputs).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=fmt,
        help="train a tiny model on a shipped corpus and show the documents behind its answers (offline)",
        description="Train a tiny GPT-2 on a small shipped corpus about a fictional world, build its "
        "gradient cache, and show for a few prompts which training documents helped or hurt the "
        "model's answer. Runs offline in about a minute on a CPU.",
    )
    p.add_argument(
        "--output-dir",
        default="hf_grass_demo",
        help="where the trained model and its gradient cache are written (an earlier demo's directory "
        "is overwritten; any other non-empty directory is refused)",
    )
    p.add_argument("--plot", metavar="PATH", help="also save the score distributions as a PNG (matplotlib)")
    p.add_argument("-k", type=_positive_int, default=3, help="documents shown per table")
    # a shorter training for tests; the recipe above is what makes the demo's point
    p.add_argument("--epochs", type=_positive_int, default=DEMO_EPOCHS, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "build",
        parents=[common],
        help="attribution pass over a dataset -> gradient cache",
        description="Run the attribution pass: compress the per-example gradient of every training "
        "document into a sharded on-disk cache (an existing cache with the same configuration is "
        "resumed).",
    )
    _add_model_arguments(p, required=True)
    g = p.add_argument_group("dataset")
    g.add_argument(
        "--dataset",
        required=True,
        help="a .jsonl/.json/.csv/.parquet file, a directory saved with datasets' save_to_disk, a data "
        "directory, or a Hub dataset id (datasets.load_dataset)",
    )
    g.add_argument("--split", default="train", help="split of a Hub dataset or DatasetDict (default: train)")
    g.add_argument("--text-column", default="text", help="column holding the documents (default: text)")
    g.add_argument("--max-examples", type=_positive_int, help="only the first N examples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--verify",
        action="store_true",
        help="when resuming, also check the sha256 of the shards already written and recompute damaged ones",
    )
    add_config_arguments(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "query",
        parents=[common],
        help="the training documents behind a model's completion of a prompt",
        description="For each prompt, generate the model's completion (or take --completion) and list "
        "the training documents that most helped (score > 0) and most hurt (score < 0) it.",
    )
    p.add_argument("--cache", required=True, help="gradient cache directory or Hub dataset repo id")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="one prompt per line, or JSON Lines with 'prompt' and optional 'completion' fields",
    )
    g.add_argument(
        "--completion",
        help="attribute this completion instead of generating one (applies to every prompt without its own)",
    )
    g.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=32,
        help="length of generated completions (default: 32)",
    )
    g = p.add_argument_group("output")
    g.add_argument("-k", type=_positive_int, default=10, help="documents per list (default: 10)")
    g.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    g.add_argument(
        "--plot",
        metavar="PATH",
        help="save a PNG of each prompt's score distribution with the top documents marked (matplotlib)",
    )
    g = p.add_argument_group("scoring overrides (default: the cache's configuration)")
    g.add_argument("--preconditioner", choices=list(PRECONDITIONERS), help="fim, kfac, ekfac or identity")
    g.add_argument("--damping", type=float, help="damping as a fraction of the mean eigenvalue")
    g.add_argument(
        "--cosine", action=argparse.BooleanOptionalAction, default=None, help="cosine-normalise scores"
    )
    g.add_argument(
        "--no-check-model",
        action="store_true",
        help="score even if the model's weights differ from those the cache was built with",
    )
    _add_model_arguments(p, required=False)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser(
        "info",
        parents=[common],
        help="summary of a gradient cache",
        description="Summarise a gradient cache.",
    )
    p.add_argument("cache", metavar="CACHE", help="gradient cache directory or Hub dataset repo id")
    p.add_argument("--verify", action="store_true", help="check the sha256 of every file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "push",
        parents=[common],
        help="upload a gradient cache to a Hub dataset repo",
        description="Upload a (complete, verified) gradient cache with a dataset card to a Hugging Face "
        "dataset repo in one commit.",
    )
    p.add_argument("cache_dir", metavar="CACHE_DIR", help="the gradient cache directory")
    p.add_argument("repo_id", metavar="REPO_ID", help="dataset repo, namespace/name (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created if needed; default: main)")
    p.add_argument("--token", help="Hub token (default: the saved login or HF_TOKEN)")
    p.add_argument("--commit-message", help="commit message")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "pull",
        parents=[common],
        help="download a gradient cache from the Hub",
        description="Download a gradient cache from a Hub dataset repo and verify every checksum.",
    )
    p.add_argument("repo_id", metavar="REPO_ID", help="dataset repo, namespace/name")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument(
        "--local-dir",
        help="where to put it (default: <HF_HOME>/hf_grass/datasets--<namespace>--<name>/<revision>)",
    )
    p.add_argument("--token", help="Hub token for private repos")
    p.add_argument("--force-download", action="store_true", help="download every file again")
    p.set_defaults(func=cmd_pull)
    return parser


# =================================================================================================
# entry point
# =================================================================================================


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-grass`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on usage errors and 0 after --help
        return int(exit_.code or 0)
    if getattr(args, "command", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    sub = args.command
    try:
        return int(args.func(args))
    except UsageError as err:
        if debug:
            raise
        print(f"{PROG} {sub}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG} {sub}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        from hf_grass.cache.files import CacheError

        expected = isinstance(err, (ValueError, FileNotFoundError, CacheError, OSError, ImportError))
        message = str(err).strip() or type(err).__name__
        if not expected:
            message = f"{type(err).__name__}: {message} (run with --debug for the traceback)"
        print(f"{PROG} {sub}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
