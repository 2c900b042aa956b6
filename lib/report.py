"""HTML for reviewers without Jupyter. The pages are Jinja2 templates (lib/templates/, rendered by
lib/pages.py): every string that came from outside (API answers, record values, object keys, error
messages) is escaped by the templates' autoescape before it reaches a page; the pages carry no script.
This module gathers what the pages show (manifests, stage records, objects read back).

- `write(run_dir)`: `report.html` of one run (status, source, quarantine, changes, every object
  written, reconciliation, lineage picture), `quarantine.html` beside it, and each executed notebook
  as a page;
- `write_index(outputs)`: `outputs/index.html`, every run newest first, with trend pictures;
- `after_run(run_dir)`: both, after a run (never fails the run).
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from lib import log as logsetup
from lib import (changes, charts, config, endings, files, formats, hints, layout, pages, registry, review, runs,
                 storage, terminal)

log = logging.getLogger(__name__)

# --- reading the run's objects back (the quarantine and the change report) ----------------------------

def _store(settings=None):
    """The local object store's client, or None with the reason when it cannot be reached quickly."""
    try:
        settings = settings or config.settings()
        where = urlparse(settings.store.url)
        with socket.create_connection((where.hostname, where.port or 443), timeout=2):
            pass
        return storage.client(settings.store), None
    except Exception as err:  # noqa: BLE001 - the page says why it could not show the object
        return None, f"{type(err).__name__}: {err}"


def _read_object(obj: dict, store, read=None) -> tuple:
    """An object's bytes, or what `read` makes of its body read as a stream (only as far as it reads),
    and None; or None and why the page cannot show it."""
    client, why = store
    if client is None:
        return None, why
    try:
        if read is None:
            data, _ = storage.get_bytes(client, obj["bucket"], obj["key"])
            return data, None
        body, _ = storage.open_object(client, obj["bucket"], obj["key"])
        try:
            return read(body), None
        finally:
            body.close()
    except Exception as err:  # noqa: BLE001 - the page says why it could not show the object
        return None, str(err)


def _records(key: str, data: bytes) -> list[dict]:
    """The rows of a quarantine object, in whichever format it was written, as dicts."""
    return formats.of_key(key).read(data).to_dict(orient="records")


def _object(manifest: dict, stage: str, predicate) -> dict | None:
    for obj in (manifest.get("stages", {}).get(stage) or {}).get("objects", []) or []:
        if obj.get("key") and predicate(obj["key"]):
            return obj
    return None


# --- the lineage picture --------------------------------------------------------------------------------

COLUMNS = registry.lineage_columns()


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


def _lineage(manifest: dict) -> dict | None:
    """The lineage picture's layout: a column per step, a box per URI, an edge per hop; None when no
    object was written."""
    column: dict[str, int] = {}
    for n, stage in enumerate(registry.NAMES, start=1):
        for obj in (manifest.get("stages", {}).get(stage) or {}).get("objects", []) or []:
            if obj.get("uri"):
                column.setdefault(obj["uri"], n)
    edges = [(x["from"], x["to"]) for x in manifest.get("lineage", []) if x.get("from") and x.get("to")]
    for src, dst in edges:  # an input this run did not write (the source, or another run's object): the step before
        column.setdefault(src, max(column.get(dst, 1) - 1, 0))
    if not column:
        return None
    by_col: dict[int, list[str]] = {}
    for uri, col in column.items():
        by_col.setdefault(col, []).append(uri)
    w, h, gap_x, gap_y, top = 200, 40, 60, 16, 30
    pos = {uri: (20 + col * (w + gap_x), top + i * (h + gap_y))
           for col, uris in by_col.items() for i, uri in enumerate(sorted(uris))}
    height = top + max(len(v) for v in by_col.values()) * (h + gap_y) + 10
    width = 20 + len(COLUMNS) * (w + gap_x)
    boxes = []
    for uri, (x, y) in pos.items():
        fill = ("#fff3cd" if "snapshot" in uri else "#e7eef9") if column[uri] == 0 else \
            "#fde2e1" if "/quarantine" in uri else "#eef6ee"
        boxes.append({"uri": uri, "x": x, "y": y, "fill": fill, "label": _short(uri)})
    return {"run_id": manifest.get("run_id"), "width": width, "height": height, "box_width": w, "box_height": h,
            "columns": [{"x": 20 + col * (w + gap_x), "name": name} for col, name in enumerate(COLUMNS)],
            "edges": [{"x1": pos[src][0] + w, "y1": pos[src][1] + h / 2, "x2": pos[dst][0], "y2": pos[dst][1] + h / 2}
                      for src, dst in edges if src in pos and dst in pos],
            "boxes": boxes}


def lineage_svg(manifest: dict) -> str:
    """API or snapshot → raw → clean/quarantine → table → export → gold, as inline SVG (no script)."""
    return pages.render("lineage.html", lineage=_lineage(manifest))


# --- report.html ------------------------------------------------------------------------------------

def _quarantine(manifest: dict, s: dict, run_dir: Path, store) -> int | None:
    """How many records were quarantined (None: not known, stage 2 did not finish); writes
    quarantine.html beside report.html with every record and its reasons."""
    obj = _object(manifest, review.CLEAN, layout.is_quarantine)
    if s["quarantined"] is None or obj is None:
        return None
    count = s["quarantined"]
    data, why = _read_object(obj, store) if count else (b"", None)
    rows = columns = None
    if data is not None:
        rows = _records(obj["key"], data) if count else []
        columns = list(rows[0]) if rows else ["record", "raw_object", "name_common", "reasons", "source"]
    files.write(run_dir / "quarantine.html", pages.render(
        "quarantine.html", run_id=s["run_id"], count=count, uri=obj["uri"], sha256=obj.get("sha256"),
        rows=rows, columns=columns, why=why))
    return count


CHANGE_ROWS_SHOWN = 1000  # a run page's change table: its first rows (changes.json has every one)


def change_rows(report) -> dict:
    """The first `CHANGE_ROWS_SHOWN` rows of a change report (a dict, or changes.json as a file read
    forward: `changes.listed_json`), and whether there are more (`cut`): a rerun that retires a
    million countries shows a table, not a million rows, and reads only the first of them."""
    limit = CHANGE_ROWS_SHOWN + 1
    rows = changes.listed(report, limit) if isinstance(report, dict) else changes.listed_json(report, limit)
    return {"rows": rows[:CHANGE_ROWS_SHOWN], "cut": len(rows) > CHANGE_ROWS_SHOWN, "shown": CHANGE_ROWS_SHOWN,
            "why": None}


def _changes(manifest: dict, s: dict, store) -> dict | None:
    """The change report's first rows (`rows`, None when there is nothing to list; `change_rows`), or
    why it could not be read (`why`); None when not known (stage 5 did not finish)."""
    if s["added"] is None:
        return None
    obj = _object(manifest, review.GOLD, layout.is_changes)
    if obj is None or not (s["removed"] or s["changed"] or (s["added"] and s["previous_run_id"])):
        return {"rows": None, "why": None}
    shown, why = _read_object(obj, store, change_rows)  # read only as far as the rows shown
    return shown if shown is not None else {"rows": None, "why": str(why)}


def _objects(manifest: dict) -> list[dict]:
    """Every object the run wrote, with the stage that wrote it."""
    return [{"stage": stage, **obj} for stage in registry.NAMES
            for obj in (manifest.get("stages", {}).get(stage) or {}).get("objects", []) or []]


def _failure(manifest: dict, s: dict, notebook_pages: dict[str, str]) -> dict | None:
    """What the failure banner says (None when the run did not fail): the failed stage and its page,
    or the preflight's problems; what was left unpublished."""
    if s["status"] in ("succeeded", "running"):
        return None
    failed = s["failed"]
    return {"failed": failed, "page": notebook_pages.get(failed["stage"]) if failed else None,
            "preflight": [str(p) for p in manifest.get("preflight") or []],
            "unpublished": [(st, review.PUBLISHES.get(st, st)) for st in s["unpublished"]],
            "resume": hints.command("--resume", s["run_id"])}


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


# What a notebook page adds to nbconvert's style: a table's cells wrap, long words and URIs broken
# anywhere (but no column narrower than 5 characters), so that a wide preview fits its cell in a
# 1,280 px window instead of scrolling sideways in it.
NOTEBOOK_STYLE = ("<style>.jp-OutputArea-output table{max-width:100%}.jp-OutputArea-output td,"
                  ".jp-OutputArea-output th{overflow-wrap:anywhere;min-width:5ch;padding:.25em}</style>")


def notebook_page(notebook: Path) -> str:
    """Render one executed notebook as `<stem>.html` beside it; returns the page's name."""
    body, _ = _exporter().from_filename(str(notebook))
    # The page needs no script: drop the CDN loaders, which fail offline and only serve widgets/math.
    body = _strip_remote_scripts(body).replace("</head>", NOTEBOOK_STYLE + "</head>", 1)
    files.write(notebook.parent / f"{notebook.stem}.html", body)
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

    # With the stage notebooks' language: a notebook without one is coloured by IPython's lexer, which
    # the runner would import for this page alone (~0.15 s of CPU).
    language = {"language_info": {"name": "python", "pygments_lexer": "ipython3"}}
    _exporter().from_notebook_node(new_notebook(metadata=language, cells=[
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
    notebook_pages = _notebook_pages(run_dir, manifest, rendered)
    needs_store = bool(s["quarantined"]) or bool(s["removed"] or s["changed"] or s["added"])
    store = _store() if needs_store else (None, "not needed")
    stages = []
    for stage in manifest.get("requested_stages", []):
        entry = manifest.get("stages", {}).get(stage, {"status": "not run"})
        stages.append({"stage": stage, "status": entry.get("status"), "seconds": entry.get("duration_s", ""),
                       "rows in": entry.get("rows_in", ""), "rows out": entry.get("rows_out", ""),
                       "error": entry.get("error", ""), "notebook": stage})
    reconciliation = manifest.get("reconciliation")
    stack = manifest.get("stack", {})
    page = pages.render(
        "report.html", s=s, banner_class={"succeeded": "ok", "running": "running"}.get(s["status"], "failed"),
        failure=_failure(manifest, s, notebook_pages), quarantined=_quarantine(manifest, s, run_dir, store),
        changes=_changes(manifest, s, store), objects=_objects(manifest), stages=stages,
        notebook_pages=notebook_pages, attempts=[p for p in notebook_pages if ".attempt" in p],
        reconciliation=reconciliation if isinstance(reconciliation, list) else None,
        not_reconciled=str(reconciliation) if reconciliation else None, lineage=_lineage(manifest),
        services={kind: stack.get(kind, {}).get("kind") for kind in ("object_store", "database", "cloud")})
    return files.write(run_dir / "report.html", page)


# --- index.html -------------------------------------------------------------------------------------

MAX_ERROR = 300  # characters of a failed run's error in its index row (its report shows it whole)


def _index_row(s: dict, outputs: Path) -> dict:
    """One run's row of the index: its summary `s`, its folder's link, when it started, and its
    executed notebooks (attempts left out) as (link, label): the notebook's page once rendered,
    else the notebook itself."""
    run_dir = runs.runs_dir(outputs) / s["run_id"]
    notebooks = [(f"{Path(nb).stem}.html", Path(nb).stem) if (run_dir / f"{Path(nb).stem}.html").exists()
                 else (nb, nb) for nb in s["notebooks"] if ".attempt" not in nb]
    return {"s": s, "base": f"runs/{s['run_id']}", "started": (s["started"] or "")[:19].replace("T", " "),
            "notebooks": notebooks, "error": terminal.shorten((s["failed"] or {}).get("error") or "", MAX_ERROR)}


def trends(outputs: Path | str) -> dict[str, str | None]:
    """Draw the index's trend pictures beside it (lib/charts.py): picture → file name, or None when
    no run has its figures yet. The runner has its run's kernel call this after the last stage."""
    outputs = Path(outputs)
    outputs.mkdir(parents=True, exist_ok=True)
    return charts.write(review.summaries(outputs), outputs)


def pages_of(outputs: Path, run_ids: list[str]) -> None:
    """The pages of runs that `endings.sweep` marked (a rendering problem is logged, not raised)."""
    for run_id in run_ids:
        try:
            write(runs.runs_dir(outputs) / run_id)
        except Exception as err:  # noqa: BLE001 - `report RUN_ID` renders them again
            log.warning("the pages of run %s were not written: %s", run_id, err)


def sweep(outputs: Path, holding_lock: str | None = None) -> list[str]:
    """Mark the runs that ended without a verdict (lib/endings.py `sweep`, `holding_lock` as there)
    and write their pages."""
    marked = endings.sweep(outputs, holding_lock)
    pages_of(outputs, marked)
    return marked


def write_index(outputs: Path, pictures: dict[str, str | None] | None = None) -> Path:
    """`outputs/index.html`: every run newest first, and trend pictures beside it (`pictures`: the
    ones `trends` drew already; drawn here when None). Runs that ended without a verdict are marked
    first (lib/endings.py), with their pages."""
    outputs.mkdir(parents=True, exist_ok=True)
    sweep(outputs)
    rows = review.summaries(outputs)
    if pictures is None:
        pictures = trends(outputs)
    page = pages.render("index.html", rows=[_index_row(s, outputs) for s in rows],
                        layers=list(review.LAYERS.values()), pictures=pictures,
                        snapshots=sum(1 for s in rows if s["source"] == "snapshot"))
    return files.write(outputs / "index.html", page)


def write_all(outputs: Path) -> Path:
    """`run_pipeline.py report --all`: every run's report, then the index."""
    sweep(outputs)
    for s in review.summaries(outputs):
        write(runs.runs_dir(outputs) / s["run_id"])
    return write_index(outputs)


def after_run(run_dir: Path, notebook_pages: Pages | None = None, pictures=None) -> None:
    """The runner's hook after a run: its report and the index (`notebook_pages`: the run's `Pages`, which
    renders the notebook pages with an exporter made ready during the run; `pictures`: a function
    giving the trend pictures drawn meanwhile elsewhere, or None when they are still to draw). A
    rendering problem is logged, never turned into a failed run."""
    try:
        rendered = notebook_pages.done() if notebook_pages is not None else None
        log.info("report: %s", write(run_dir, rendered))
        log.info("index: %s", write_index(run_dir.parent.parent, pictures() if pictures is not None else None))
    except (files.NoSpace, logsetup.LogWriteError) as err:  # a full disk, said in one line: `report RUN_ID` writes them later
        log.warning("the pages of run %s were not written: %s", run_dir.name, err)
    except Exception:  # noqa: BLE001
        log.warning("could not render the report of %s", run_dir, exc_info=True)
