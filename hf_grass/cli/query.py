"""``hf-grass query``: the training documents behind a model's completion of each prompt."""

from __future__ import annotations

import argparse
import json
import math
import sys

from hf_grass.cli.common import EXIT_OK, UsageError, check_output_file, existing_file, positive_int, status
from hf_grass.cli.highlight import format_token_result, write_html
from hf_grass.cli.loaders import add_model_arguments, model_from_args, open_cache_arg, read_jsonl
from hf_grass.cli.plots import matplotlib_classes, plot_scores
from hf_grass.config import PRECONDITIONERS
from hf_grass.results import SCORE_LEGEND, format_result


def read_prompts(args: argparse.Namespace, required: bool = True) -> list[tuple[str, str | None]]:
    """(prompt, completion) pairs from --prompt and --prompts-file (``required``: at least one)."""
    pairs: list[tuple[str, str | None]] = [(p, args.completion) for p in args.prompt or []]
    if args.prompts_file:
        path = existing_file(args.prompts_file, "prompts file")
        if path.suffix.lower() in (".jsonl", ".json"):
            for number, row in enumerate(read_jsonl(path), 1):
                if not isinstance(row.get("prompt"), str):
                    raise UsageError(f"row {number} of {path} has no string 'prompt' field")
                pairs.append((row["prompt"], row.get("completion", args.completion)))
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            pairs += [(line, args.completion) for line in lines if line.strip()]
    if not pairs and required:
        raise UsageError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    for prompt, _ in pairs:
        if not prompt.strip():
            raise UsageError("a prompt is empty: give the text whose completion you want to explain")
    return pairs


def add_prompt_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("prompts" + ("" if required else " (queries)"))
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
        type=positive_int,
        default=32,
        help="length of generated completions (default: 32)",
    )


def cmd_query(args: argparse.Namespace) -> int:
    """Top-k helpful and harmful training documents for each prompt, as tables or JSON."""
    pairs = read_prompts(args)
    plot_path = check_output_file(args.plot, "--plot") if args.plot else None
    html_path = check_output_file(args.html, "--html") if args.html else None
    if plot_path is not None:
        matplotlib_classes()  # fail now, not after the work
    if args.damping is not None and (not math.isfinite(args.damping) or args.damping < 0):
        raise UsageError(f"--damping must be a finite number >= 0, got {args.damping}")
    if args.refine_steps < 0:
        raise UsageError(f"--refine-steps must be >= 0, got {args.refine_steps}")
    if args.refine_steps and (args.tokens or args.html):
        raise UsageError("--refine-steps cannot be combined with --tokens / --html (token scores split the EK-FAC query)")
    cache = open_cache_arg(args.cache, lazy=args.lazy)
    from hf_grass.scoring import check_k

    try:
        check_k(args.k, cache.num_rows)
    except ValueError as err:
        raise UsageError(f"-k {args.k}: {err} ({args.cache})") from None
    model, tokenizer = model_from_args(args, cache)
    from hf_grass.query import Attributor

    attributor = Attributor(
        model,
        tokenizer,
        cache,
        preconditioner=args.preconditioner,
        damping=args.damping,
        cosine=args.cosine,
        cosine_norms=args.cosine_norms,
        check_model=not args.no_check_model,
        search="exact" if args.exact else args.search,
        candidates=args.candidates,
        refine_steps=args.refine_steps,
    )
    results, panels = [], []
    for prompt, completion in pairs:
        # generation options only where the completion is generated (given, they would do nothing)
        generation = {"max_new_tokens": args.max_new_tokens} if completion is None else {}
        result = attributor.find_influential(
            prompt, k=args.k, completion=completion, all_scores=plot_path is not None,
            tokens=args.tokens or html_path is not None, **generation,
        )  # fmt: skip
        results.append(result)
        if result.scores is not None:
            panels.append((result, result.scores))
        if not args.json:
            print(format_result(result) + "\n")
            if args.tokens:  # colours only for a terminal; a pipe or a log gets the marked-up form
                print(format_token_result(result, color=sys.stdout.isatty()) + "\n")
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False))
    else:
        print(SCORE_LEGEND)
    if plot_path is not None:
        plot_scores(plot_path, panels)
        status(f"Score distribution plotted to {plot_path}")
    if html_path is not None:
        write_html(html_path, results)
        status(f"Token attribution report written to {html_path}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this command's parser (its flags sit next to its code)."""
    p = sub.add_parser(
        "query",
        parents=[common],
        help="the training documents behind a model's completion of a prompt",
        description="For each prompt, generate the model's completion (or take --completion) and list "
        "the training documents that most helped (score > 0) and most hurt (score < 0) it.",
    )
    p.add_argument("--cache", required=True, help="gradient cache directory or Hub dataset repo id")
    add_prompt_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("-k", type=positive_int, default=10, help="documents per list (default: 10)")
    g.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    g.add_argument(
        "--tokens",
        action="store_true",
        help="also split each listed document's score over its tokens and the query's (re-runs those "
        "documents; nothing is cached): highlighted in a terminal, marked up otherwise, in --json as token_scores",
    )
    g.add_argument(
        "--html",
        metavar="FILE",
        help="write a self-contained HTML report of the prompts, completions and documents with their tokens "
        "shaded by contribution (implies the token scores of --tokens)",
    )
    g.add_argument(
        "--plot",
        metavar="PATH",
        help="save a PNG of each prompt's score distribution with the top documents marked (matplotlib)",
    )
    g = p.add_argument_group("scoring overrides (default: the cache's configuration)")
    g.add_argument("--preconditioner", choices=list(PRECONDITIONERS), help="fim, kfac, ekfac or identity")
    g.add_argument("--damping", type=float, help="damping as a fraction of the mean eigenvalue")
    g.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        help="refine each query's EK-FAC iHVP by this many conjugate-gradient steps with exact Gauss-Newton "
        "products over 32 of the cache's documents (query time grows with each; default 0: EK-FAC alone)",
    )
    g.add_argument(
        "--cosine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="unit-normalise scores by the exact norms of both sides (see --cosine-norms)",
    )
    g.add_argument(
        "--cosine-norms",
        choices=["preconditioned", "gradient"],
        help="the norms --cosine divides by: preconditioned (||H^-1/2 g||, the default) or gradient (||g||)",
    )
    g.add_argument(
        "--no-check-model",
        action="store_true",
        help="score even if the model's weights differ from those the cache was built with",
    )
    g = p.add_argument_group("lookup (hf-grass index builds the indexes)")
    g.add_argument(
        "--search",
        choices=["auto", "exact", "index", "bm25", "index+bm25"],
        default="auto",
        help="auto: the cache's FAISS index if it has one, else scan every row; bm25 / index+bm25: "
        "BM25 candidates from the documents' text (alone or joined); scores are exact in every case",
    )
    g.add_argument("--exact", action="store_true", help="scan every row (same as --search exact)")
    g.add_argument("--candidates", type=positive_int, help="rows re-scored per list in a two-stage lookup")
    g.add_argument(
        "--lazy",
        action="store_true",
        help="Hub cache: download only the shards the lookup reads (with an index: those of the candidates)",
    )
    add_model_arguments(p, required=False)
    p.set_defaults(func=cmd_query)
