"""The ``hf-grass`` command line.

::

    hf-grass demo                          train a tiny model on a shipped corpus and explain it (offline)
    hf-grass build  --model M --dataset D  attribution pass over a dataset -> gradient cache
    hf-grass query  --cache C --prompt P   the training documents behind the model's completion of P
    hf-grass index  CACHE                  build the FAISS (and BM25) index of a cache for fast lookups
    hf-grass score  --cache C --dataset D  rank D's documents per query during a pass, storing nothing
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

import sys
from collections.abc import Sequence

from hf_grass.cli.common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, PROG, UsageError
from hf_grass.cli.parser import make_parser

__all__ = ["UsageError", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-grass`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = make_parser()
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
