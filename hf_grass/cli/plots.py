"""Score-distribution plots (``--plot``), drawn with matplotlib's Agg canvas."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_grass.cli.common import UsageError, status
from hf_grass.results import snippet

if TYPE_CHECKING:
    import torch

    from hf_grass.results import InfluenceResult

MAX_PLOT_PANELS = 12


def plot_scores(path: Path, panels: Sequence[tuple[InfluenceResult, torch.Tensor]], label: int = 5) -> None:
    """A PNG with, per query, the histogram of its scores over the whole cache, the top helpful
    (green) and harmful (red) documents marked and labelled by dataset index."""
    Figure, FigureCanvasAgg = matplotlib_classes()
    if len(panels) > MAX_PLOT_PANELS:  # one figure stays readable; the tables have every prompt
        status(f"Plotting the first {MAX_PLOT_PANELS} of {len(panels)} prompts.")
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
        title = f"{snippet(result.prompt, 60)!r} -> {snippet(result.completion, 40)!r}"
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("documents")
    axes[-1].set_xlabel("influence score (> 0 helpful: green, < 0 harmful: red); labels are dataset indices")
    fig.savefig(path, dpi=120)


def matplotlib_classes() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed: pip install 'hf-grass[plot]'"
        ) from None
    return Figure, FigureCanvasAgg
