"""MkDocs hook: pages may write ``{{ grass_config_fields }}`` to get a table of every ``GraSSConfig``
field (name, type, default, help text), generated from the dataclass itself so it never drifts."""

from __future__ import annotations

import dataclasses

PLACEHOLDER = "{{ grass_config_fields }}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def config_table() -> str:
    from hf_grass.config import GraSSConfig

    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(GraSSConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append(f"| `{f.name}` | {_cell(typ)} | `{default!r}` | {_cell(f.metadata.get('help', ''))} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    if PLACEHOLDER in markdown:
        markdown = markdown.replace(PLACEHOLDER, config_table())
    return markdown
