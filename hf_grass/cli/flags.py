"""``GraSSConfig`` <-> command-line flags: one flag per field, same names and defaults."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Sequence
from typing import Any

from hf_grass.cli.common import UsageError, positive_int
from hf_grass.config import COMPRESSORS, DTYPES, PRECONDITIONERS, GraSSConfig

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
            kwargs["type"] = positive_int if base is int and f.name != "seed" else base
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
