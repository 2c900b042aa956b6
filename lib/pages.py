"""The HTML of the review pages: one Jinja2 environment over lib/templates/, and `render`.

Every value a template prints is escaped (autoescape), so a string that came from outside (an API
answer, a record value, an object key, an error message) shows as text and never as markup; a
template marks a value `|safe` only when it is HTML already made safe, and says why beside it. A
name the template does not get is an error (StrictUndefined), not an empty string on the page.

Templates: `base.html` (the page and its style), `macros.html` (a table, its cells, plurals),
`report.html`, `quarantine.html`, `index.html`, `lineage.html` and `record.html` (what a notebook's
last cell shows). This module is the bottom layer of the pages: it imports nothing from lib.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).parent / "templates"


def _json(value) -> str:
    """A value that is not text, as the pages show it: JSON, non-ASCII characters kept."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _numeric(value) -> bool:
    """A number shown right-aligned: an int or a float, but not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
ENV.filters["json"] = _json
ENV.tests["numeric"] = _numeric


def render(template_name: str, /, **context) -> str:
    """The text of template `template_name` (a file in lib/templates/) rendered with `context`."""
    return ENV.get_template(template_name).render(**context)
