"""lib.pages: the one Jinja2 environment of the review pages (autoescape, StrictUndefined) and the
shared macros of lib/templates/macros.html."""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from html.parser import HTMLParser

import jinja2
import pytest

from lib import pages
from tests.conftest import ROOT

SCRIPT = "<script>window.pwned=1</script>"
QUOTES = "\"double\" 'single' & \u200fRTL\r\n"


def macro(source: str, **context) -> str:
    """`source` rendered in the pages' environment, with the shared macros imported."""
    return pages.ENV.from_string('{% from "macros.html" import table, cell, plural %}' + source).render(**context)


class Cells(HTMLParser):
    """Each table row as a list of (class attribute, text) of its cells, and the table's id."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.rows, self.heads, self.table_id, self._cell = [], [], None, None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table_id = attrs.get("id")
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = [tag, attrs.get("class"), ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            kind, cls, text = self._cell
            (self.heads if kind == "th" else self.rows[-1]).append(text if kind == "th" else (cls, text))
            self._cell = None


def test_a_value_is_escaped_in_text_and_in_attributes():
    page = pages.ENV.from_string('<p title="{{ value }}">{{ value }}</p>').render(value=SCRIPT + QUOTES)
    assert "<script>" not in page and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    assert '"double"' not in page and "'single'" not in page and " & " not in page
    assert page.count("&#34;double&#34;") == 2 and page.count("&#39;single&#39;") == 2
    assert "\u200fRTL\r\n" in page  # other characters are kept as they are


def test_a_page_template_escapes_what_it_is_given():
    page = pages.render("quarantine.html", run_id=SCRIPT, count=1, uri=f"s3://clean/{SCRIPT}.csv", sha256=None,
                        rows=[{"record": 1, "name_common": SCRIPT, "source": QUOTES}],
                        columns=["record", "name_common", "source"], why=None)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.startswith("<!doctype html>\n") and page.endswith("</body></html>\n")
    assert "<title>Quarantine of run &lt;script&gt;window.pwned=1&lt;/script&gt;</title>" in page
    table = Cells(page[page.index("<table"):])
    assert table.table_id == "quarantined"
    assert table.rows[1] == [("num", "1"), (None, SCRIPT), ("uri", QUOTES)]  # shown exactly, as text


def test_a_missing_variable_is_an_error_not_an_empty_string():
    with pytest.raises(jinja2.UndefinedError, match="run_id"):
        pages.render("quarantine.html", count=1, uri="s3://x", sha256=None, rows=[], columns=[], why=None)
    with pytest.raises(jinja2.UndefinedError, match="nowhere"):
        pages.ENV.from_string("<p>{{ nowhere }}</p>").render()
    with pytest.raises(jinja2.UndefinedError):
        pages.ENV.from_string("<p>{{ row.nowhere }}</p>").render(row={})
    with pytest.raises(jinja2.TemplateNotFound):
        pages.render("no-such-page.html")


def test_the_table_macro_marks_uri_columns_and_shows_every_kind_of_value():
    uri = "s3://clean/countries/ingest_date=2026-11-28/run_id=" + "x" * 80 + f"/{SCRIPT}.csv"
    rows = [{"uri": uri, "size": 10, "sha256": "a" * 64, "rows": 250},
            {"uri": "postgresql://db/public.t", "size": 1.5, "sha256": None, "rows": True},
            {"uri": "s3://b/k", "sha256": {"k": "é"}, "rows": ["a", 1]}]
    page = macro('{{ table(rows, ["uri", "size", "sha256", "rows"], uri_columns=("uri", "sha256"), id="objects") }}',
                 rows=rows)
    table = Cells(page)
    assert table.table_id == "objects" and table.heads == ["uri", "size", "sha256", "rows"]
    assert table.rows[1:] == [
        [("uri", uri), ("num", "10"), ("uri", "a" * 64), ("num", "250")],
        [("uri", "postgresql://db/public.t"), ("num", "1.5"), ("uri", ""), (None, "true")],  # a bool is not a number
        [("uri", "s3://b/k"), (None, ""), ("uri", '{"k": "é"}'), (None, '["a", 1]')],  # missing: empty; JSON as is
    ]
    assert "<script>" not in page and f'<td class="uri">{uri.replace("<", "&lt;").replace(">", "&gt;")}</td>' in page
    # Without uri_columns and id: plain cells, and no id attribute at all.
    plain = macro('{{ table([{"uri": "s3://a"}], ["uri"]) }}')
    assert plain == "<table><thead><tr><th>uri</th></tr></thead><tbody><tr><td>s3://a</td></tr></tbody></table>"


def test_plural_and_cell():
    assert macro('{{ plural(0, "run") }}|{{ plural(1, "run") }}|{{ plural(2, "record") }}') == "0 runs|1 run|2 records"
    assert macro("{{ cell(value) }}", value=None) == "<td></td>"
    assert macro("{{ cell(value, true) }}", value=SCRIPT) == '<td class="uri">&lt;script&gt;window.pwned=1&lt;/script&gt;</td>'
    assert macro("{{ cell(value) }}", value=float("nan")) == '<td class="num">nan</td>'


def test_pages_is_a_bottom_layer_module_importing_nothing_from_lib():
    tree = ast.parse((ROOT / "lib" / "pages.py").read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not [name for name in imported if name == "lib" or name.startswith("lib.")], imported
    assert pages.ENV.autoescape is True and pages.ENV.undefined is jinja2.StrictUndefined


def test_every_template_is_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lib"]
    templates = sorted(p.relative_to(pages.TEMPLATES.parent).as_posix() for p in pages.TEMPLATES.iterdir())
    assert {"templates/base.html", "templates/macros.html"} <= set(templates)
    assert [t for t in templates if not any(fnmatch.fnmatch(t, p) for p in patterns)] == []
