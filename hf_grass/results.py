"""What a lookup returns: `InfluenceResult`, its documents, and how they are printed.

One formatting for every front door: ``print(result)`` in Python, the ``hf-grass query`` tables and
the demo all use ``format_result``.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # results and their printing need no torch (``hf-grass --help`` stays quick)
    import torch

SCORE_LEGEND = (
    "score > 0  helpful: upweighting the document in training would lower the loss of this completion\n"
    "score < 0  harmful: upweighting it would raise that loss (it pushes towards another answer)"
)


@dataclass
class TokenScores:
    """A score split over the tokens of a text (``find_influential(..., tokens=True)``):
    ``scores[t]`` is the contribution of token ``tokens[t]``, and the contributions sum to ``score``.

    A token's contribution is what flows through its position: its inputs to every attributed module
    times the gradient arriving there, from its own next-token loss and every later one
    (``hf_grass.scoring.tokens``). ``score`` is the document's score recomputed from re-running the
    document and the query (float64); the cached score (``InfluentialDocument.score``) differs from it
    by the rounding of the cache's storage dtype only.
    """

    tokens: list[str]  # each token as text, decoded in context (special tokens included)
    ids: list[int]
    scores: list[float]  # > 0 pushes the document's score up (helpful), < 0 down
    score: float  # what they sum to
    start: int = 0  # query tokens: where the completion begins (the tokens before are the prompt)

    def top(self, n: int = 5) -> list[tuple[str, float]]:
        """The ``n`` tokens of largest contribution in absolute value, largest first."""
        order = sorted(range(len(self.scores)), key=lambda t: -abs(self.scores[t]))[:n]
        return [(self.tokens[t], self.scores[t]) for t in order]


@dataclass
class InfluentialDocument:
    index: int  # dataset index of the training example
    score: float  # > 0 helpful (proponent), < 0 harmful (opponent)
    text: str | None
    id: Any = None
    token_scores: TokenScores | None = None  # the score over the document's tokens (tokens=True)
    query_token_scores: TokenScores | None = None  # the score over the query's tokens (tokens=True)


@dataclass
class InfluenceResult:
    prompt: str
    completion: str
    documents: list[InfluentialDocument]  # most helpful first; only documents with score > 0
    # most harmful first; only documents with score < 0, so it may be shorter than k, or empty
    harmful: list[InfluentialDocument] = field(default_factory=list)
    scores: torch.Tensor | None = None  # every cached row's score (row order), when asked for

    def __str__(self) -> str:
        return format_result(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "completion": self.completion,
            "documents": [_document_dict(d) for d in self.documents],
            "harmful": [_document_dict(d) for d in self.harmful],
        }


def _document_dict(doc: InfluentialDocument) -> dict[str, Any]:
    """A document as JSON-ready values; token scores only when they were asked for."""
    out = dataclasses.asdict(doc)
    for key in ("token_scores", "query_token_scores"):
        if out[key] is None:
            del out[key]
    return out


def ranked_result(
    prompt: str,
    completion: str,
    best: tuple[Sequence[float], Sequence[int]],
    worst: tuple[Sequence[float], Sequence[int]],
    documents: Mapping[int, Mapping[str, Any]],
) -> InfluenceResult:
    """An ``InfluenceResult`` from one query's lists, ``(scores, indices)`` highest first and lowest
    first, with each document's ``text`` and ``id`` looked up in ``documents``.

    "Helpful" means score > 0 and "harmful" score < 0 (DESIGN.md §2): the top of a ranking is not
    helpful when its scores are negative, nor its bottom harmful when they are positive, so each list
    keeps only the scores of its sign (maybe none)."""
    return InfluenceResult(
        prompt,
        completion,
        listed_documents(*best, documents, sign=1),
        listed_documents(*worst, documents, sign=-1),
    )


def listed_documents(
    scores: Sequence[float], indices: Sequence[int], documents: Mapping[int, Mapping[str, Any]], sign: int = 0
) -> list[InfluentialDocument]:
    """The documents of a list, in its order; ``sign``: keep only scores > 0 (1) or < 0 (-1)."""
    out = []
    for score, index in zip(scores, indices):
        if sign and not score * sign > 0:
            continue
        doc = documents.get(index, {})
        out.append(InfluentialDocument(index=index, score=score, text=doc.get("text"), id=doc.get("id")))
    return out


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


def snippet(text: str | None, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters."""
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
            row += f"{snippet(doc_id, id_width):<{id_width}}  "
        lines.append(row + snippet(d.text, text_width))
    return lines


def format_result(result: InfluenceResult, width: int | None = None) -> str:
    lines = [f"Prompt:     {result.prompt!r}", f"Completion: {result.completion!r}", ""]
    if result.documents:
        lines += ["Most helpful training documents:"] + format_documents(result.documents, width)
    else:
        lines += ["Most helpful training documents: none (no document scores above 0 for this completion)"]
    if result.harmful:
        lines += ["", "Most harmful training documents:"] + format_documents(result.harmful, width)
    else:
        lines += ["", "Most harmful training documents: none (no document scores below 0 for this completion)"]
    return "\n".join(lines)
