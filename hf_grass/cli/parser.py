"""The ``hf-grass`` parser: the top-level flags, and one sub-parser per command module."""

from __future__ import annotations

import argparse

from hf_grass._version import __version__
from hf_grass.cli import build, demo, index, manage, query, score
from hf_grass.cli.common import PROG

# in the order ``hf-grass --help`` lists them
COMMANDS = (demo, build, index, query, score, manage)


def common_arguments() -> argparse.ArgumentParser:
    """The flags every command takes (``--debug``), as a parent parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks on errors"
    )
    return common


def make_parser() -> argparse.ArgumentParser:
    common = common_arguments()
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Training-data attribution for Hugging Face causal LMs (FactGraSS gradient caches). "
        f"Start with '{PROG} demo'.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage error (bad arguments or missing inputs).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub, common)
    return parser
