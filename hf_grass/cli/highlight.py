"""Token scores to look at: terminal highlighting and a self-contained HTML report.

Both shade each token by its contribution to the document's score (``TokenScores``): green where it
pushes the score up, red where it pushes it down, the shade's strength the contribution relative to
the largest one in absolute value of that text. A document's tokens are shaded by their share of its
score; the query's tokens (prompt and completion) by their share of the same score, per document.

- ``format_token_result``: text for a terminal, with ANSI background colours (``color=True``, when
  stdout is a TTY) or a plain marked-up form (``[+token]`` / ``[-token]`` around the strongest
  tokens) for pipes and logs; long documents are cut to a window around their strongest token.
- ``html_report`` / ``write_html``: one HTML page, inline CSS and no script or external asset, every
  text escaped; the whole of every document.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

from hf_grass._version import __version__
from hf_grass.results import InfluenceResult, InfluentialDocument, TokenScores, format_score

HELPFUL_RGB = (46, 160, 67)  # the shade of a token that pushes the score up
HARMFUL_RGB = (207, 34, 46)  # and of one that pushes it down
MARK_SHARE = 0.25  # the plain form marks the tokens of at least this share of the largest contribution
LIGHT_TEXT = 0.55  # from this shade on, a token's letters are white (black ones drown in the colour)
WINDOW = 80  # tokens of a document shown in a terminal (around its strongest token)


def shares(scores: TokenScores) -> list[float]:
    """Each token's contribution divided by the largest in absolute value (in [-1, 1]; all 0 when
    every contribution is 0)."""
    top = max((abs(s) for s in scores.scores), default=0.0)
    return [s / top if top > 0 else 0.0 for s in scores.scores]


def _window(scores: TokenScores, limit: int) -> tuple[int, int]:
    """``[lo, hi)``: at most ``limit`` tokens around the strongest one."""
    n = len(scores.scores)
    if n <= limit:
        return 0, n
    peak = max(range(n), key=lambda t: abs(scores.scores[t]))
    lo = min(max(peak - limit // 2, 0), n - limit)
    return lo, lo + limit


# ---- terminal -------------------------------------------------------------------------------------


def terminal_tokens(scores: TokenScores, color: bool, limit: int | None = WINDOW, dim_before: int = 0) -> str:
    """One text's tokens, shaded (``color``) or marked up; ``limit``: a window of that many tokens
    around the strongest (None: all); ``dim_before``: tokens before it are greyed (a query's prompt)."""
    lo, hi = _window(scores, limit) if limit else (0, len(scores.scores))
    parts = ["…" if lo > 0 else ""]
    for t, share in zip(range(lo, hi), shares(scores)[lo:hi]):
        text = scores.tokens[t].replace("\n", "↵\n")
        if color:
            parts.append(_ansi(text, share, dim=t < dim_before))
        elif abs(share) >= MARK_SHARE:
            parts.append(f"[{'+' if share > 0 else '-'}{text}]")
        else:
            parts.append(text)
    parts.append("…" if hi < len(scores.scores) else "")
    return "".join(parts)


def _ansi(text: str, share: float, dim: bool) -> str:
    """``text`` on a background shaded by ``share`` (24-bit colour, black letters where shaded)."""
    strength = min(abs(share), 1.0)
    if strength < 0.05:
        return f"\x1b[2m{text}\x1b[0m" if dim else text
    r, g, b = _blend(HELPFUL_RGB if share > 0 else HARMFUL_RGB, strength)
    ink = "255;255;255" if strength >= LIGHT_TEXT else "0;0;0"
    return f"\x1b[38;2;{ink};48;2;{r};{g};{b}m{text}\x1b[0m"


def _blend(rgb: tuple[int, int, int], strength: float) -> tuple[int, int, int]:
    r, g, b = (round(255 - (255 - c) * strength) for c in rgb)
    return r, g, b


def format_token_result(result: InfluenceResult, color: bool = False, limit: int | None = WINDOW) -> str:
    """Every listed document with token scores: its tokens, then the query's for it."""
    lines = [f"Prompt:     {result.prompt!r}", f"Completion: {result.completion!r}"]
    for title, docs in (("helpful", result.documents), ("harmful", result.harmful)):
        shown = [d for d in docs if d.token_scores is not None]
        if not shown:
            continue
        lines += ["", f"Token scores of the most {title} documents (shade: share of the document's score):"]
        for rank, doc in enumerate(shown, 1):
            lines += ["", _header(rank, doc)]
            assert doc.token_scores is not None
            lines.append("  document: " + terminal_tokens(doc.token_scores, color, limit))
            if doc.query_token_scores is not None:
                q = doc.query_token_scores
                lines.append("  query:    " + terminal_tokens(q, color, None, dim_before=q.start))
            strongest = ", ".join(f"{tok.strip() or repr(tok)} {format_score(s)}" for tok, s in doc.token_scores.top(5))
            lines.append(f"  strongest: {strongest}")
    if len(lines) == 2:
        lines += ["", "No token scores (ask for them with --tokens / find_influential(..., tokens=True))."]
    return "\n".join(lines)


def _header(rank: int, doc: InfluentialDocument) -> str:
    ident = f"  id {doc.id}" if doc.id is not None else ""
    rerun = f" (re-run {format_score(doc.token_scores.score)})" if doc.token_scores is not None else ""
    return f"  #{rank}  score {format_score(doc.score)}{rerun}  index {doc.index}{ident}"


# ---- HTML -----------------------------------------------------------------------------------------

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; margin: 2em auto;
       max-width: 60em; padding: 0 1em; }
h1 { font-size: 1.4em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.legend { color: #57606a; font-size: .9em; }
.swatch { display: inline-block; width: 2.4em; height: .9em; vertical-align: middle; border-radius: 2px; }
.query { border: 1px solid #d0d7de; border-radius: 6px; padding: .6em 1em; background: #f6f8fa; }
.label { color: #57606a; font-size: .85em; margin-right: .4em; }
.doc { border: 1px solid #d0d7de; border-radius: 6px; padding: .6em 1em; margin: .8em 0; }
.doc.helpful { border-left: 5px solid rgb(46,160,67); } .doc.harmful { border-left: 5px solid rgb(207,34,46); }
.meta { font-size: .9em; color: #57606a; margin-bottom: .3em; } .meta b { color: #1f2328; }
.tokens { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .85em; white-space: pre-wrap;
          word-break: break-word; }
.tokens span { border-radius: 2px; } .prompt-token { color: #8c959f; }
.top { font-size: .85em; color: #57606a; margin-top: .3em; }
.none { color: #57606a; font-style: italic; }
"""


def _span(text: str, share: float, value: float, css_class: str = "") -> str:
    strength = min(abs(share), 1.0)
    rgb = HELPFUL_RGB if share > 0 else HARMFUL_RGB
    ink = ";color:#fff" if strength >= LIGHT_TEXT else ""
    style = f' style="background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{strength:.2f}){ink}"' if strength >= 0.02 else ""
    cls = f' class="{css_class}"' if css_class else ""
    return f'<span{cls}{style} title="{html.escape(format_score(value))}">{html.escape(text)}</span>'


def _tokens_html(scores: TokenScores, dim_before: int = 0) -> str:
    spans = [
        _span(tok, share, value, "prompt-token" if t < dim_before and abs(share) < 0.3 else "")
        for t, (tok, share, value) in enumerate(zip(scores.tokens, shares(scores), scores.scores))
    ]
    return f'<div class="tokens">{"".join(spans)}</div>'


def _doc_html(rank: int, doc: InfluentialDocument, kind: str) -> str:
    esc = html.escape
    parts = [f'<article class="doc {kind}">', '<div class="meta">',
             f"<b>#{rank}</b> · score <b>{esc(format_score(doc.score))}</b>"]  # fmt: skip
    if doc.token_scores is not None:
        parts.append(f" (re-run {esc(format_score(doc.token_scores.score))})")
    parts.append(f" · index {doc.index}" + (f" · id {esc(str(doc.id))}" if doc.id is not None else "") + "</div>")
    if doc.token_scores is None:
        parts.append(f'<div class="tokens">{esc(doc.text or "")}</div>')
    else:
        parts.append('<div class="label">document tokens</div>' + _tokens_html(doc.token_scores))
        strongest = ", ".join(f"{esc(repr(tok))} {esc(format_score(s))}" for tok, s in doc.token_scores.top(5))
        parts.append(f'<div class="top">strongest: {strongest}</div>')
    if doc.query_token_scores is not None:
        q = doc.query_token_scores
        parts.append('<div class="label">query tokens, for this document (prompt grey, then the completion)</div>')
        parts.append(_tokens_html(q, dim_before=q.start))
    parts.append("</article>")
    return "".join(parts)


def _result_html(result: InfluenceResult) -> str:
    esc = html.escape
    out = ['<section class="result">', '<div class="query">',
           f'<div><span class="label">Prompt</span>{esc(result.prompt)}</div>',
           f'<div><span class="label">Completion</span><b>{esc(result.completion)}</b></div></div>']  # fmt: skip
    for kind, title, docs in (("helpful", "Most helpful documents (score &gt; 0)", result.documents),
                              ("harmful", "Most harmful documents (score &lt; 0)", result.harmful)):  # fmt: skip
        out.append(f"<h2>{title}</h2>")
        if not docs:
            out.append(f'<p class="none">none: no document scores {"above" if kind == "helpful" else "below"} 0</p>')
        out += [_doc_html(rank, doc, kind) for rank, doc in enumerate(docs, 1)]
    out.append("</section>")
    return "".join(out)


def html_report(results: Sequence[InfluenceResult], title: str = "hf-grass: token attribution") -> str:
    """One self-contained HTML page of ``results`` (inline CSS; no script, font or image to load)."""
    green = f"rgb{HELPFUL_RGB}"
    red = f"rgb{HARMFUL_RGB}"
    legend = (
        f'<span class="swatch" style="background:{green}"></span> pushes the document\'s score up &nbsp; '
        f'<span class="swatch" style="background:{red}"></span> pushes it down &nbsp;·&nbsp; shade: the '
        "token's contribution relative to the largest in that text (hover a token for its value). A token's "
        "contribution is what flows through its position: its activations times the gradient arriving there, "
        "from its own next-token loss and every later one; they sum to the document's score recomputed by "
        "re-running it (shown as re-run)."
    )
    body = "".join(_result_html(r) for r in results)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=\"legend\">{legend}</p>{body}"
        f'<p class="legend">hf-grass {html.escape(__version__)}</p></body></html>\n'
    )


def write_html(path: str | os.PathLike, results: Sequence[InfluenceResult], title: str | None = None) -> Path:
    """Write ``html_report(results)`` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(html_report(results, title) if title else html_report(results), encoding="utf-8")
    return path
