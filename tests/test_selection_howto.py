"""The complete example of docs/howto/selection.md runs as printed, and selects what it says: most
of the task's documents, and a lower target loss than a random selection of the same size."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "howto" / "selection.md"


def example_code() -> str:
    """The page's Python block under "## A complete example"."""
    section = PAGE.read_text().split("## A complete example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_selection_howto_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # its cache and output folders
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example_code(), str(PAGE), "exec"), {"__name__": "howto"})
    relevant = re.search(r"relevant: (\d+) of the 40 selected", out.getvalue())
    losses = re.search(r"target loss: selected ([\d.]+), random ([\d.]+)", out.getvalue())
    assert relevant and losses, out.getvalue()[-2000:]
    assert int(relevant.group(1)) >= 30  # 4 expected at random
    assert float(losses.group(1)) < float(losses.group(2))
