"""Helpers shared by the benchmark scripts: the machine's description and the JSON report."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (recorded with every report: numbers depend on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def emit_report(report: dict[str, Any], json_out: Path | None) -> dict[str, Any]:
    """Print the JSON report and, with ``--json-out``, also write it to that file."""
    text = json.dumps(report, indent=2)
    print("\n" + text)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    return report
