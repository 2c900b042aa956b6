"""HTML for reviewers without Jupyter. Every string that came from outside (API answers, record values,
object keys, error messages) is escaped before it reaches a page; the pages carry no script.

- `write(run_dir)`: `report.html` of one run (status, source, quarantine, changes, every object
  written, reconciliation, lineage picture), `quarantine.html` beside it, and each executed notebook
  as a page;
- `write_index(outputs)`: `outputs/index.html`, every run newest first, with trend pictures;
- `after_run(run_dir)`: both, after a run (never fails the run);
- `RecordView`: what `Stage.finish()` returns, so a notebook's last cell shows what was recorded.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from lib import registry, review, runs

log = logging.getLogger(__name__)
e = html.escape

CSS = """body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222;max-width:1500px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right}code,.uri{font-family:monospace;
word-break:break-all}.banner{padding:.8em 1em;margin:.8em 0;border-radius:4px;font-weight:600}
.snapshot{background:#fff3cd;border:2px solid #e0a800;color:#6b4e00}.failed{background:#fde2e1;
border:2px solid #c0392b;color:#7b1d14}.ok{background:#e3f4e6;border:1px solid #3c8d4f;color:#1e5128}
.running{background:#e7eef9;border:1px solid #4c72b0}.badge{padding:1px 6px;border-radius:3px;
font-size:90%}.b-snapshot{background:#e0a800;color:#000}.b-failed,.b-interrupted{background:#c0392b;
color:#fff}.b-succeeded{background:#3c8d4f;color:#fff}.b-running{background:#4c72b0;color:#fff}
section.q{border-left:4px solid #4c72b0;padding:.1em 1em;margin:1em 0}img{max-width:100%}"""


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{CSS}</style></head><body>\n{body}\n</body></html>\n')


def _cell(value, uri: bool = False) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{e(str(value))}</td>'
    text = "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return f'<td{" class=uri" if uri else ""}>{e(text)}</td>'


def _table(rows: list[dict], columns: list[str], uri_columns: tuple[str, ...] = (), table_id: str = "") -> str:
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c, ""), c in uri_columns) for c in columns) + "</tr>" for r in rows)
    ident = f' id="{e(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --- reading the run's objects back (the quarantine and the change report) ----------------------------

def _store(settings=None):
    """The local object store's client, or None with the reason when it cannot be reached quickly."""
    from lib import config, storage

    try:
        settings = settings or config.settings()
        where = urlparse(settings.store.url)
        with socket.create_connection((where.hostname, where.port or 443), timeout=2):
            pass
        return storage.client(settings.store), None
    except Exception as err:  # noqa: BLE001 - the page says why it could not show the object
        return None, f"{type(err).__name__}: {err}"


def _read_object(obj: dict, store) -> tuple[bytes | None, str | None]:
    from lib import storage

    client, why = store
    if client is None:
        return None, why
    try:
        data, _ = storage.get_bytes(client, obj["bucket"], obj["key"])
        return data, None
    except Exception as err:  # noqa: BLE001
        return None, str(err)


def _records(key: str, data: bytes) -> list[dict]:
    """The rows of a quarantine object (CSV or Parquet) as dicts of plain values."""
    if key.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def _object(manifest: dict, stage: str, predicate) -> dict | None:
    for obj in (manifest.get("stages", {}).get(stage) or {}).get("objects", []) or []:
        if obj.get("key") and predicate(obj["key"]):
            return obj
    return None


# --- the lineage picture --------------------------------------------------------------------------------

COLUMNS = ["source", "raw", "clean / quarantine", "table", "export", "gold"]


def _short(uri: str) -> str:
    """A box label: the bucket and file name, the table, or what the source was."""
    if uri.startswith("bundled snapshot"):
        return "bundled snapshot"
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return f"API {parsed.hostname}"
    if parsed.scheme == "postgresql":
        return f"PostgreSQL {uri.rsplit('/', 1)[-1]}"
    if parsed.scheme == "s3":
        label = f"{parsed.netloc}/…/{uri.rsplit('/', 1)[-1]}"
    else:
        label = uri
    return label if len(label) <= 30 else label[:29] + "…"


def lineage_svg(manifest: dict) -> str:
    """API or snapshot → raw → clean/quarantine → table → export → gold, as inline SVG (no script)."""
    column: dict[str, int] = {}
    for n, stage in enumerate(registry.NAMES, start=1):
        for obj in (manifest.get("stages", {}).get(stage) or {}).get("objects", []) or []:
            if obj.get("uri"):
                column.setdefault(obj["uri"], n)
    edges = [(x["from"], x["to"]) for x in manifest.get("lineage", []) if x.get("from") and x.get("to")]
    for src, _ in edges:
        column.setdefault(src, 0)
    if not column:
        return "<p>No objects were written, so there is no lineage to draw.</p>"
    by_col: dict[int, list[str]] = {}
    for uri, col in column.items():
        by_col.setdefault(col, []).append(uri)
    w, h, gap_x, gap_y, top = 200, 40, 60, 16, 30
    pos = {uri: (20 + col * (w + gap_x), top + i * (h + gap_y))
           for col, uris in by_col.items() for i, uri in enumerate(sorted(uris))}
    height = top + max(len(v) for v in by_col.values()) * (h + gap_y) + 10
    width = 20 + len(COLUMNS) * (w + gap_x)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="lineage of run '
             f'{e(str(manifest.get("run_id")))}" viewBox="0 0 {width} {height}" width="{width}" '
             f'style="max-width:100%;font-family:sans-serif;font-size:12px">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
             'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>']
    for col, name in enumerate(COLUMNS):
        parts.append(f'<text x="{20 + col * (w + gap_x)}" y="16" font-weight="bold">{e(name)}</text>')
    for src, dst in edges:
        if src in pos and dst in pos:
            (x1, y1), (x2, y2) = pos[src], pos[dst]
            parts.append(f'<line x1="{x1 + w}" y1="{y1 + h / 2}" x2="{x2}" y2="{y2 + h / 2}" stroke="#666" '
                         'marker-end="url(#arrow)"/>')
    for uri, (x, y) in pos.items():
        fill = ("#fff3cd" if "snapshot" in uri else "#e7eef9") if column[uri] == 0 else \
            "#fde2e1" if "/quarantine" in uri else "#eef6ee"
        parts.append(f'<g><title>{e(uri)}</title><rect x="{x}" y="{y}" width="{w}" height="{h}" rx="5" '
                     f'fill="{fill}" stroke="#888"/><text x="{x + 6}" y="{y + 24}">{e(_short(uri))}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


# --- report.html ------------------------------------------------------------------------------------

def _source_banner(s: dict) -> str:
    if s["source"] == "snapshot":
        reason = s["fallback_reason"] or "the API could not be reached"
        return (f'<div class="banner snapshot" id="source">⚠ BUNDLED SNAPSHOT USED: this run did not read the '
                f'live API, its data is the offline snapshot shipped in lib/data/countries_v3.1.json. '
                f'Reason: {e(str(reason))}</div>')
    if s["source"] == "api":
        return '<p id="source">Source: the live API.</p>'
    return '<p id="source">Source: stage 1 did not run in this run.</p>'


def _quarantine(manifest: dict, s: dict, run_dir: Path, store) -> str:
    """The quarantine answer on report.html; writes quarantine.html with every record and reason."""
    obj = _object(manifest, review.CLEAN, lambda k: k.startswith("quarantine/"))
    if s["quarantined"] is None or obj is None:
        return '<p id="quarantine-answer">Not known: stage 2 (clean) did not finish in this run.</p>'
    count = s["quarantined"]
    data, why = _read_object(obj, store) if count else (b"", None)
    if data is not None:
        rows = _records(obj["key"], data) if count else []
        columns = list(rows[0]) if rows else ["record", "raw_object", "name_common", "reasons", "source"]
        listing = _table(rows, columns, uri_columns=("raw_object", "source"), table_id="quarantined")
    else:
        listing = f"<p>The quarantine object could not be read ({e(str(why))}); it is at the URI above.</p>"
    page = (f'<p><a href="report.html">← run {e(s["run_id"])}</a></p><h1>Quarantined records of run '
            f'{e(s["run_id"])}: {count}</h1><p>Object: <span class="uri">{e(obj["uri"])}</span> '
            f'(sha256 {e(str(obj.get("sha256")))})</p>{listing}')
    (run_dir / "quarantine.html").write_text(_page(f"Quarantine of run {s['run_id']}", page), encoding="utf-8")
    if not count:
        return ('<p id="quarantine-answer">Nothing quarantined: every record passed the silver contract '
                '(<a href="quarantine.html">quarantine object</a> is empty).</p>')
    return (f'<p id="quarantine-answer" class="banner snapshot">{count} record{"s" if count != 1 else ""} '
            f'quarantined — <a href="quarantine.html">see the records and their reasons</a>.</p>')


def _changes(manifest: dict, s: dict, store) -> str:
    if s["added"] is None:
        return '<p id="changes-answer">Not known: stage 5 (gold) did not finish in this run.</p>'
    against = (f'since run <code>{e(s["previous_run_id"])}</code>' if s["previous_run_id"]
               else "the first gold table (nothing to compare with)")
    text = (f'<p id="changes-answer">{s["added"]} added, {s["removed"]} removed, {s["changed"]} changed — '
            f'{against}.</p>')
    obj = _object(manifest, review.GOLD, lambda k: k.endswith("/changes.json"))
    if obj is None or not (s["removed"] or s["changed"] or (s["added"] and s["previous_run_id"])):
        return text
    data, why = _read_object(obj, store)
    if data is None:
        return text + f"<p>The change report could not be read ({e(str(why))}).</p>"
    from lib import changes

    rows = changes.table(json.loads(data)).to_dict(orient="records")
    return text + _table(rows, ["country", "change", "field", "old", "new"], table_id="changes")


def _objects(manifest: dict) -> str:
    rows = [{"stage": stage, **obj} for stage in registry.NAMES
            for obj in (manifest.get("stages", {}).get(stage) or {}).get("objects", []) or []]
    if not rows:
        return '<p id="objects-answer">No object was written.</p>'
    return (f'<p id="objects-answer">{len(rows)} object{"s" if len(rows) != 1 else ""} written:</p>'
            + _table(rows, ["stage", "uri", "size", "sha256", "rows"], uri_columns=("uri", "sha256"),
                     table_id="objects"))


def _failure(manifest: dict, s: dict, pages: dict[str, str]) -> str:
    if s["status"] in ("succeeded", "running"):
        return ""
    parts = []
    if s["failed"]:
        stage = s["failed"]["stage"]
        where = (f'Its executed notebook, saved up to the failing cell with the traceback in place: '
                 f'<a href="{e(pages[stage])}">{e(stage)}</a>.' if stage in pages else "")
        parts.append(f'Stage <b>{e(stage)}</b> {e(s["status"])} in <code>{e(s["failed"]["error"])}</code>. {where}')
    elif manifest.get("preflight"):
        parts.append("The preflight failed, nothing ran: " + "; ".join(e(str(p)) for p in manifest["preflight"]))
    if s["unpublished"]:
        parts.append("Left unpublished: " + "; ".join(f"{e(st)}: {e(review.PUBLISHES.get(st, st))}"
                                                      for st in s["unpublished"]) + ".")
    parts.append(f"After fixing the cause: <code>python run_pipeline.py --resume {e(s['run_id'])}</code>")
    return '<div class="banner failed" id="failure">' + "<br>".join(parts) + "</div>"


def _exporter():
    """nbconvert's HTML exporter (the JupyterLab look), made once per thread: it is the costly part."""
    exporter = getattr(_LOCAL, "exporter", None)
    if exporter is None:
        exporter = _LOCAL.exporter = _page_exporter()()
    return exporter


_LOCAL = threading.local()

# What nbconvert's closing pass over the whole page adds, for screen readers and keyboards: alt text on
# images without any, and a tab stop on each cell's input and on each output.
_IMG_WITHOUT_ALT = re.compile(r"<img(?![^>]*\balt=)")
_FOCUSABLE = re.compile(r'<div class="(?:jp-Cell-inputWrapper|[^"<>]*\bjp-OutputArea-output\b[^"<>]*)"')
NO_ALT = "No description has been provided for this image"


def accessible(page: str) -> str:
    """A rendered notebook page with nbconvert's accessibility additions (see `_page_exporter`)."""
    page = _IMG_WITHOUT_ALT.sub(f'<img alt="{NO_ALT}"', page)
    return _FOCUSABLE.sub(lambda m: m.group(0) + ' tabindex="0"', page)


def _page_exporter():
    """nbconvert's HTMLExporter, less its last step: it parses the whole rendered page again with
    BeautifulSoup (about 0.1 s for each notebook, more than rendering it) only to add alt text and tab
    stops, which `accessible` adds to the text instead. The rest is the exporter's own: its filters
    and its template."""
    from nbconvert import HTMLExporter
    from nbconvert.exporters.templateexporter import TemplateExporter
    from nbconvert.filters.highlight import Highlight2HTML
    from nbconvert.filters.widgetsdatatypefilter import WidgetsDataTypeFilter

    class PageExporter(HTMLExporter):
        def from_notebook_node(self, nb, resources=None, **kw):
            # HTMLExporter.from_notebook_node (nbconvert 7.17) up to its BeautifulSoup pass.
            langinfo = nb.metadata.get("language_info", {})
            lexer = langinfo.get("pygments_lexer", langinfo.get("name", None))
            # The stage notebooks are plain Python: pygments' Python lexer colours them as IPython's
            # does, without importing IPython (~0.15 s) into the runner for it.
            lexer = {"ipython3": "python3", "ipython": "python"}.get(lexer, lexer)
            self.register_filter("highlight_code", self.filters.get(
                "highlight_code", Highlight2HTML(pygments_lexer=lexer, parent=self)))
            resources = self._init_resources(resources)
            self.register_filter("filter_data_type", WidgetsDataTypeFilter(
                notebook_metadata=self._nb_metadata, parent=self, resources=resources))
            page, resources = TemplateExporter.from_notebook_node(self, nb, resources, **kw)
            return accessible(page), resources

    return PageExporter


def notebook_page(notebook: Path) -> str:
    """Render one executed notebook as `<stem>.html` beside it; returns the page's name."""
    body, _ = _exporter().from_filename(str(notebook))
    # The page needs no script: drop the CDN loaders, which fail offline and only serve widgets/math.
    body = _strip_remote_scripts(body)
    (notebook.parent / f"{notebook.stem}.html").write_text(body, encoding="utf-8")
    return f"{notebook.stem}.html"


def _notebook_pages(run_dir: Path, manifest: dict, rendered: dict[str, str] | None = None) -> dict[str, str]:
    """Render every executed notebook of the run (attempts included) beside it; stage → page name.
    `rendered`: pages already rendered from the notebooks as they are now (see `Pages.done`)."""
    rendered = rendered or {}
    return {notebook.stem: rendered.get(notebook.stem) or notebook_page(notebook)
            for notebook in sorted(run_dir.glob("*.ipynb"))}


class Pages:
    """The runner's notebook pages. nbconvert is imported, and its templates compiled on a small
    notebook, in a background thread from the start of the stages, while the kernel boots (this
    process only waits for it then); the run's executed notebooks are rendered in that thread once
    the stages are over (`done`), while the kernel draws the index's trends.

    Not while the stages run: each cell's next request comes from this process, and a page being
    rendered held the GIL when the kernel's reply arrived. In a 250-record run of 47 cells the kernel
    waited ~0.6 s in all between its cells with pages rendered as the next stage ran, ~0.35 s without
    (measured); rendering five pages at the end takes ~0.15 s, beside the trends' ~0.3 s."""

    def __init__(self, run_dir: Path):
        from concurrent.futures import ThreadPoolExecutor

        self.run_dir = run_dir
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pages")
        self.pool.submit(_warm_up)

    def done(self) -> dict[str, str]:
        """Render every executed notebook of the run (attempts included); stem → page name. One that
        cannot be rendered is left out here (`write` renders it again, and reports the error)."""
        futures = {notebook.stem: self.pool.submit(notebook_page, notebook)
                   for notebook in sorted(self.run_dir.glob("*.ipynb"))}
        out = {}
        for stem, future in futures.items():
            try:
                out[stem] = future.result()
            except Exception:  # noqa: BLE001
                log.debug("rendering %s in the background failed", stem, exc_info=True)
        self.pool.shutdown(wait=True)
        return out


def _warm_up() -> None:
    """The exporter of this thread, with its templates compiled: the first page rendered takes twice
    as long as the next ones."""
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    _exporter().from_notebook_node(new_notebook(cells=[
        new_markdown_cell("# warm-up"),
        new_code_cell("1", outputs=[new_output("stream", name="stdout", text="1\n")])]))


def _strip_remote_scripts(page: str) -> str:
    return re.sub(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>', "", page)


def write(run_dir: Path, rendered: dict[str, str] | None = None) -> Path:
    """Render the run's report, its quarantine page and its executed notebooks (but those in
    `rendered`, stem → page, rendered already); returns report.html."""
    manifest = runs.read_json(run_dir / "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"no run record at {run_dir}")
    s = review.summary(manifest, run_dir)
    pages = _notebook_pages(run_dir, manifest, rendered)
    needs_store = bool(s["quarantined"]) or bool(s["removed"] or s["changed"] or s["added"])
    store = _store() if needs_store else (None, "not needed")
    stages = []
    for stage in manifest.get("requested_stages", []):
        entry = manifest.get("stages", {}).get(stage, {"status": "not run"})
        stages.append({"stage": stage, "status": entry.get("status"), "seconds": entry.get("duration_s", ""),
                       "rows in": entry.get("rows_in", ""), "rows out": entry.get("rows_out", ""),
                       "error": entry.get("error", ""), "notebook": stage})
    stage_rows = "".join(
        "<tr>" + "".join(_cell(r[c]) for c in ("stage", "status", "seconds", "rows in", "rows out", "error"))
        + (f'<td><a href="{e(pages[r["stage"]])}">{e(r["stage"])}</a></td>' if r["stage"] in pages else "<td></td>")
        + "</tr>" for r in stages)
    attempts = [p for p in pages if ".attempt" in p]
    reconciliation = manifest.get("reconciliation")
    recon_html = (_table(reconciliation, ["hop", "records", "fingerprint", "compared with", "status"],
                         table_id="reconciliation")
                  if isinstance(reconciliation, list) else
                  f"<p>Not reconciled ({e(str(reconciliation)) if reconciliation else 'stage 5 did not finish'}).</p>")
    stack = manifest.get("stack", {})
    status = s["status"]
    banner_class = {"succeeded": "ok", "running": "running"}.get(status, "failed")
    body = f"""<p><a href="../../index.html">← all runs</a></p>
<h1>Run {e(s['run_id'])}: {e(status)}</h1>
<div class="banner {banner_class}" id="status">Status: {e(status.upper())} · started {e(str(s['started']))} ·
ended {e(str(s['ended']))} · {e(str(s['duration_s']))} s · started by {e(s['origin'])}</div>
{_source_banner(s)}
{_failure(manifest, s, pages)}
<section class="q"><h2>Anything quarantined?</h2>{_quarantine(manifest, s, run_dir, store)}</section>
<section class="q"><h2>What changed?</h2>{_changes(manifest, s, store)}</section>
<section class="q"><h2>Where is my data?</h2>{_objects(manifest)}</section>
<h2>Stages</h2><table id="stages"><thead><tr><th>stage</th><th>status</th><th>seconds</th><th>rows in</th>
<th>rows out</th><th>error</th><th>executed notebook</th></tr></thead><tbody>{stage_rows}</tbody></table>
{'<p>Earlier attempts: ' + ', '.join(f'<a href="{e(pages[a])}">{e(a)}</a>' for a in attempts) + '</p>' if attempts else ''}
<h2>Reconciliation</h2>{recon_html}
<h2>Lineage</h2>{lineage_svg(manifest)}
<h2>Services</h2><p>Object store: {e(str(stack.get('object_store', {}).get('kind')))};
database: {e(str(stack.get('database', {}).get('kind')))}; cloud: {e(str(stack.get('cloud', {}).get('kind')))}.</p>
<p>Everything else about this run is in <a href="manifest.json">manifest.json</a> beside this page.</p>"""
    path = run_dir / "report.html"
    path.write_text(_page(f"Run {s['run_id']}: {status}", body), encoding="utf-8")
    return path


# --- index.html -------------------------------------------------------------------------------------

def _index_row(s: dict, outputs: Path) -> str:
    rid = e(s["run_id"])
    base = f"runs/{rid}"
    report_link = f'<a href="{base}/report.html">{rid}</a>' if s["report"] else rid
    status = f'<span class="badge b-{e(s["status"])}">{e(s["status"])}</span>'
    if s["failed"]:
        status += f'<br><small>at {e(s["failed"]["stage"])}: {e(s["failed"]["error"][:300])}</small>'
    source = {"api": "API", None: "-"}.get(s["source"], "")
    if s["source"] == "snapshot":
        source = '<span class="badge b-snapshot">⚠ SNAPSHOT</span>'
    elif s["source"] not in ("api", None):
        source = e(str(s["source"]))
    run_dir = runs.runs_dir(outputs) / s["run_id"]
    notebooks = " ".join(
        f'<a href="{base}/{e(Path(nb).stem)}.html">{e(Path(nb).stem)}</a>' if (run_dir / f"{Path(nb).stem}.html").exists()
        else f'<a href="{base}/{e(nb)}">{e(nb)}</a>' for nb in s["notebooks"] if ".attempt" not in nb)
    num = lambda v: f'<td class="num">{"" if v is None else e(str(v))}</td>'  # noqa: E731
    return (f"<tr><td>{report_link}</td><td>{e((s['started'] or '')[:19].replace('T', ' '))}</td>"
            f"<td>{e(s['origin'])}</td><td>{status}</td><td>{source}</td>"
            + "".join(num(s["rows"][layer]) for layer in review.LAYERS.values())
            + num(s["quarantined"]) + num(s["added"]) + num(s["removed"]) + num(s["changed"])
            + num(s["duration_s"]) + f"<td>{notebooks}</td></tr>")


def trends(outputs: Path | str) -> dict[str, str | None]:
    """Draw the index's trend pictures beside it (lib/charts.py): picture → file name, or None when
    no run has its figures yet. The runner has its run's kernel call this after the last stage."""
    from lib import charts

    outputs = Path(outputs)
    outputs.mkdir(parents=True, exist_ok=True)
    return charts.write(review.summaries(outputs), outputs)


def write_index(outputs: Path, pictures: dict[str, str | None] | None = None) -> Path:
    """`outputs/index.html`: every run newest first, and trend pictures beside it (`pictures`: the
    ones `trends` drew already; drawn here when None)."""
    outputs.mkdir(parents=True, exist_ok=True)
    rows = review.summaries(outputs)
    if pictures is None:
        pictures = trends(outputs)
    head = "".join(f"<th>{e(h)}</th>" for h in ["run", "started (UTC)", "how", "status", "source",
                                                *(f"rows {layer}" for layer in review.LAYERS.values()),
                                                "quarantined", "added", "removed", "changed", "seconds",
                                                "executed notebooks"])
    table = (f'<table id="runs"><thead><tr>{head}</tr></thead><tbody>'
             + "".join(_index_row(s, outputs) for s in rows) + "</tbody></table>") if rows else \
        "<p>No runs yet: start one with <code>make run</code>.</p>"
    snapshots = sum(1 for s in rows if s["source"] == "snapshot")
    warn = (f'<div class="banner snapshot">⚠ {snapshots} of these runs used the bundled snapshot instead of '
            f'the live API.</div>' if snapshots else "")
    titles = {"rows": "Rows per layer and quarantined, per run", "durations": "Stage durations per run",
              "regions": "Population by region over time"}
    figures = "".join(f'<h3>{e(titles[k])}</h3><img src="{e(v)}" alt="{e(titles[k])}">' if v else
                     f"<h3>{e(titles[k])}</h3><p>No run has these figures yet.</p>" for k, v in pictures.items())
    body = (f"<h1>Pipeline runs</h1><p>{len(rows)} run{'s' if len(rows) != 1 else ''}, newest first. "
            "Each run id opens its report: status, source, quarantine, changes, every object written.</p>"
            f"{warn}{table}<h2>Trends</h2>{figures}")
    path = outputs / "index.html"
    path.write_text(_page("Pipeline runs", body), encoding="utf-8")
    return path


def write_all(outputs: Path) -> Path:
    """`run_pipeline.py report --all`: every run's report, then the index."""
    for s in review.summaries(outputs):
        write(runs.runs_dir(outputs) / s["run_id"])
    return write_index(outputs)


def after_run(run_dir: Path, pages: Pages | None = None, pictures=None) -> None:
    """The runner's hook after a run: its report and the index (`pages`: the run's `Pages`, which
    renders the notebook pages with an exporter made ready during the run; `pictures`: a function
    giving the trend pictures drawn meanwhile elsewhere, or None when they are still to draw). A
    rendering problem is logged, never turned into a failed run."""
    try:
        rendered = pages.done() if pages is not None else None
        log.info("report: %s", write(run_dir, rendered))
        log.info("index: %s", write_index(run_dir.parent.parent, pictures() if pictures is not None else None))
    except Exception:  # noqa: BLE001
        log.warning("could not render the report of %s", run_dir, exc_info=True)


# --- what a notebook's last cell shows ---------------------------------------------------------------

class RecordView(str):
    """The path of a saved stage record (a str) that displays as what was recorded: counts,
    objects with full URIs, details, and request attempts when there were retries."""

    def __new__(cls, path, data: dict):
        view = super().__new__(cls, str(path))
        view.data = data
        return view

    def _details(self) -> tuple[list[dict], list[tuple[str, list[dict]]]]:
        plain, tables = [], []
        for key, value in self.data.get("details", {}).items():
            if key == "attempts" and len(value or []) <= 1:
                continue  # a single successful request says nothing
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                tables.append((key, value))
            else:
                plain.append({"detail": key, "value": value})
        return plain, tables

    def _repr_html_(self) -> str:
        d = self.data
        objects = d.get("artifacts", [])
        plain, tables = self._details()
        out = [f"<p><b>Recorded</b> {e(d.get('stage', ''))} of run {e(d.get('run_id', ''))}: rows in "
               f"{e(str(d.get('rows_in')))} → rows out {e(str(d.get('rows_out')))}; "
               f"{len(objects)} object{'s' if len(objects) != 1 else ''} written. Record file: "
               f"<code>{e(str(self))}</code></p>"]
        if objects:
            out.append(_table(objects, ["uri", "size", "sha256", "rows"], uri_columns=("uri",)))
        for key, rows in tables:
            columns = list(dict.fromkeys(k for r in rows for k in r))
            out.append(f"<p><b>{e(key)}</b></p>" + _table(rows, columns))
        if plain:
            out.append(_table(plain, ["detail", "value"]))
        return "".join(out)

    def __repr__(self) -> str:
        d = self.data
        lines = [f"recorded {d.get('stage')} of run {d.get('run_id')}: rows {d.get('rows_in')} → {d.get('rows_out')}",
                 f"record: {str(self)}"]
        lines += [f"  object {o.get('uri')}  size {o.get('size')}  rows {o.get('rows')}  sha256 {o.get('sha256')}"
                  for o in d.get("artifacts", [])]
        plain, tables = self._details()
        for key, rows in tables:
            lines.append(f"  {key}:")
            lines += [f"    {json.dumps(r, ensure_ascii=False, default=str)}" for r in rows]
        lines += [f"  {p['detail']}: {json.dumps(p['value'], ensure_ascii=False, default=str)}" for p in plain]
        return "\n".join(lines)
