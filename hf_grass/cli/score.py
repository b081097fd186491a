"""``hf-grass score``: rank the documents of a dataset for each query while a pass streams through
it, storing nothing (a corpus too large to cache; data selection with ``--select``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hf_grass.cli.common import EXIT_OK, UsageError, check_output_file, positive_int, status
from hf_grass.cli.loaders import (
    add_dataset_arguments,
    add_model_arguments,
    dataset_from_args,
    load_text_dataset,
    model_from_args,
    open_cache_arg,
)
from hf_grass.cli.query import add_prompt_arguments, read_prompts
from hf_grass.results import SCORE_LEGEND, format_documents, format_result, listed_documents, ranked_result


def cmd_score(args: argparse.Namespace) -> int:
    """Each query's top-k helpful and harmful documents of --dataset; with --select, the chosen ones."""
    pairs = read_prompts(args, required=False)
    if not pairs and args.targets is None:
        raise UsageError("no query: give --prompt TEXT, --prompts-file FILE or --targets FILE")
    select_path = check_output_file(args.select_out, "--select-out") if args.select_out else None
    cache = open_cache_arg(args.cache)
    dataset = dataset_from_args(args)
    targets = load_text_dataset(args.targets) if args.targets else None
    model, tokenizer = model_from_args(args, cache)
    from hf_grass.prompts import encode_query
    from hf_grass.query import Attributor

    attributor = Attributor(model, tokenizer, cache, disable_progress=args.no_progress)
    queries: list[dict[str, Any]] = []
    shown: list[tuple[str, str]] = []
    for prompt, completion in pairs:  # prompt tokens carry no loss, as in hf-grass query
        text, answer, batch = encode_query(
            model, tokenizer, prompt, completion, documents=cache, max_new_tokens=args.max_new_tokens
        )
        queries.append({"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()})
        shown.append((text, answer))
    for row in targets or []:  # whole documents, encoded as the cache's documents were
        queries.append({"text": row["text"]})
        shown.append((row["text"], ""))
    status(f"Scoring {len(dataset)} documents against {len(queries)} queries during a pass (nothing stored) ...")
    found = attributor.score_dataset(dataset, queries, k=args.k, select=args.select)
    assert found.top is not None and found.bottom is not None

    def lists(found_lists: Any, q: int) -> tuple[list[float], list[int]]:
        return found_lists.scores[q].tolist(), found_lists.indices[q].tolist()

    def documents(*lists_: tuple[list[float], list[int]]) -> dict[int, Any]:
        return {i: dataset[i] for _, indices in lists_ for i in indices}

    results = []
    for q, (text, answer) in enumerate(shown):
        top, bottom = lists(found.top, q), lists(found.bottom, q)
        results.append(ranked_result(text, answer, top, bottom, documents(top, bottom)))
    selected = None
    if found.selected is not None:  # every score of the selection is listed, whatever its sign
        chosen = lists(found.selected, 0)
        selected = listed_documents(*chosen, documents(chosen))
    if select_path is not None and selected is not None:
        select_path.write_text(json.dumps([{"index": d.index, "score": d.score, "id": d.id} for d in selected]) + "\n")
        status(f"{len(selected)} selected indices written to {select_path}")
    if args.json:
        report: dict[str, Any] = {"results": [r.to_dict() for r in results], "skipped": found.skipped}
        if selected is not None:
            report["selected"] = [vars(d) for d in selected]
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return EXIT_OK
    for result in results:
        print(format_result(result) + "\n")
    if selected is not None:
        print(f"Selected (highest mean score over the {len(queries)} queries):")
        print("\n".join(format_documents(selected)) + "\n")
    print(SCORE_LEGEND)
    return EXIT_OK


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this command's parser (its flags sit next to its code)."""
    p = sub.add_parser(
        "score",
        parents=[common],
        help="rank a dataset's documents for each query during a pass, storing nothing",
        description="Stream --dataset through the attribution pass and keep, for each query, only its "
        "top-k helpful and harmful documents: nothing is written, so the dataset may be far larger than "
        "any cache. --cache is the reference whose configuration, eigenbasis and preconditioner fix the "
        "scores (a cache of a sample of the corpus is enough); the scores equal those of caching the "
        "dataset with that configuration and querying it. --select N also picks the N documents with "
        "the highest mean score over all queries (data selection, as LESS does).",
    )
    p.add_argument("--cache", required=True, help="reference gradient cache directory or Hub dataset repo id")
    add_dataset_arguments(p, "the documents to score")
    add_prompt_arguments(p, required=False)
    p.add_argument(
        "--targets",
        metavar="FILE",
        help="target documents as queries (loss on every token, like the cached documents): a "
        ".jsonl/.json/.csv/.parquet file with a 'text' column; combinable with --prompt",
    )
    g = p.add_argument_group("output")
    g.add_argument("-k", type=positive_int, default=10, help="documents per list (default: 10)")
    g.add_argument("--select", type=positive_int, metavar="N", help="also choose the N documents with the highest mean score")
    g.add_argument("--select-out", metavar="FILE", help="write the selected documents (index, score, id) as JSON")
    g.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(p, required=False)
    p.set_defaults(func=cmd_score)
