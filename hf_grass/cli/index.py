"""``hf-grass index``: build the FAISS (and optionally BM25) index of a cache, stored inside it."""

from __future__ import annotations

import argparse
import json

from hf_grass.cli.common import EXIT_OK, PROG, UsageError, human_bytes, positive_int, status
from hf_grass.cli.loaders import open_cache_arg


def cmd_index(args: argparse.Namespace) -> int:
    """Build (or resume building) the index; prints its manifest entry (``--json``) or a summary."""
    from hf_grass.cache.hub import is_local

    if not is_local(args.cache):
        raise UsageError(f"{args.cache!r} is a Hub repo id; pull it first ({PROG} pull), then index the folder")
    if args.factory and args.kind != "auto":
        raise UsageError("give either --kind or --factory, not both")
    cache = open_cache_arg(args.cache)
    entries = {}
    if not args.bm25_only:
        status(f"Indexing {cache.num_rows} rows of {cache.path} ({args.factory or args.kind}) ...")
        search = {k: v for k, v in (("nprobe", args.nprobe), ("efSearch", args.ef_search)) if v is not None}
        entries["index"] = cache.build_index(
            args.kind,
            factory=args.factory,
            cosine=args.cosine,
            nlist=args.nlist,
            pq_m=args.pq_m,
            train_rows=args.train_rows,
            **({"projection": args.projection} if args.projection is not None else {}),
            search=search or None,
            rebuild=args.rebuild,
            threads=args.threads,
            progress=not args.json,
        )
    if args.bm25 or args.bm25_only:
        status(f"Indexing the text of {cache.num_rows} documents with BM25 ...")
        entries["lexical_index"] = cache.indexes.build_lexical(rebuild=args.rebuild)
    if args.json:
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    for key, entry in entries.items():
        size = sum((cache.path / f["file"]).stat().st_size for f in entry["files"])
        what = entry.get("factory", "BM25") + (" (cosine)" if entry.get("cosine") else "")
        print(f"{key}: {what}, {entry['rows']} rows, {human_bytes(size)}, in {entry['files'][0]['file']}")
    print(f"Queries now use it: {PROG} query --cache {cache.path} ... (--search exact to scan every row)")
    return EXIT_OK


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this command's parser (its flags sit next to its code)."""
    p = sub.add_parser(
        "index",
        parents=[common],
        help="build the FAISS index of a gradient cache (two-stage lookups)",
        description="Build a FAISS index of a cache's rows for maximum inner product search, stored "
        "inside the cache (checksummed, listed in the manifest, pushed and pulled with it). Queries "
        "then take candidates from it and re-score them exactly. Resumable: run it again after an "
        "interruption.",
    )
    p.add_argument("cache", metavar="CACHE", help="gradient cache directory")
    p.add_argument(
        "--kind",
        choices=["auto", "ivfpq", "hnsw-sq8", "hnsw", "flat"],
        default="auto",
        help="default: auto (hnsw-sq8 for rows wider than 1024, which are projected; else ivfpq)",
    )
    p.add_argument("--factory", help="a FAISS index_factory string instead of --kind (e.g. IVF4096,PQ64)")
    p.add_argument(
        "--cosine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="index unit-normalised rows, for cosine scores (default: the cache's cosine setting)",
    )
    p.add_argument("--nlist", type=positive_int, help="ivfpq: inverted lists (default ~sqrt(rows))")
    p.add_argument("--pq-m", type=positive_int, help="ivfpq: bytes per row (default dim/16)")
    p.add_argument("--nprobe", type=positive_int, help="ivfpq: lists searched per query (stored default)")
    p.add_argument("--ef-search", type=positive_int, help="hnsw: search depth (stored default)")
    p.add_argument("--train-rows", type=positive_int, help="rows sampled to train the index")
    p.add_argument(
        "--projection",
        type=int,
        help="index a seeded sparse JL projection of each row to this many numbers (default 1024 for "
        "wider rows; 0: the rows as they are)",
    )
    p.add_argument("--threads", type=positive_int, help="FAISS threads (default: all cores)")
    p.add_argument("--rebuild", action="store_true", help="build anew even if a current index exists")
    p.add_argument("--bm25", action="store_true", help="also build the BM25 index of the documents' text")
    p.add_argument("--bm25-only", action="store_true", help="build only the BM25 index")
    p.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    p.set_defaults(func=cmd_index)
