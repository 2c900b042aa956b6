"""HTML for reviewers without Jupyter: each executed notebook of a run as a page beside it, and
`report.html`, an index with the stage summary, the reconciliation and links to the pages."""

from __future__ import annotations

import html
import logging
from pathlib import Path

from lib import runs


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write(run_dir: Path) -> Path:
    """Render the run's executed notebooks and its index; returns the index's path."""
    from nbconvert import HTMLExporter

    manifest = runs.read_json(run_dir / "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"no run record at {run_dir}")
    exporter = HTMLExporter()
    exporter.log.setLevel(logging.ERROR)  # its accessibility notes about plot alt text are noise here
    rows = []
    for stage in manifest["requested_stages"]:
        entry = manifest["stages"].get(stage, {"status": "not run"})
        notebook = run_dir / f"{stage}.ipynb"
        page = ""
        if notebook.exists():
            body, _ = exporter.from_filename(str(notebook))
            (run_dir / f"{stage}.html").write_text(body, encoding="utf-8")
            page = f"{stage}.html"
        rows.append({"stage": stage, "status": entry.get("status"), "seconds": entry.get("duration_s", ""),
                     "rows in": entry.get("rows_in", ""), "rows out": entry.get("rows_out", ""),
                     "error": entry.get("error", ""), "page": page})
    links = "".join(f'<li><a href="{r["page"]}">{html.escape(r["stage"])}</a></li>' for r in rows if r["page"])
    reconciliation = manifest.get("reconciliation")
    recon_html = (_table(reconciliation, ["hop", "records", "fingerprint", "compared with", "status"])
                  if isinstance(reconciliation, list) else "<p>Not reconciled (stage 5 did not finish).</p>")
    stack = manifest.get("stack", {})
    index = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Run {html.escape(manifest['run_id'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>
<h1>Run {html.escape(manifest['run_id'])}: {html.escape(manifest.get('status', '?'))}</h1>
<p>Started {html.escape(str(manifest.get('started')))}, ended {html.escape(str(manifest.get('ended')))}.
Object store: {html.escape(str(stack.get('object_store', {}).get('kind')))};
database: {html.escape(str(stack.get('database', {}).get('kind')))};
cloud: {html.escape(str(stack.get('cloud', {}).get('kind')))}.</p>
<h2>Stages</h2>{_table(rows, ["stage", "status", "seconds", "rows in", "rows out", "error"])}
<h2>Reconciliation</h2>{recon_html}
<h2>Executed notebooks</h2><ul>{links}</ul>
<p>Everything else about this run is in <code>manifest.json</code> beside this page.</p>
</body></html>
"""
    path = run_dir / "report.html"
    path.write_text(index, encoding="utf-8")
    return path
