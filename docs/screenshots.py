"""`make screenshots`: docs/index.png and docs/report.png, from the runs in outputs/ (the README's
pictures). Renders the pages first, so run the pipeline at least twice before."""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a script beside the project: `tests` is not installed

from lib import config, report, review, runs  # noqa: E402
from tests.browser import launch, visit  # noqa: E402


def main() -> int:
    outputs = config.outputs_dir()
    newest = review.summaries(outputs)
    if not newest:
        print("no runs in outputs/runs: `make run` first", file=sys.stderr)
        return 1
    index = report.write_index(outputs)
    page = report.write(runs.runs_dir(outputs) / newest[0]["run_id"])
    with sync_playwright() as p:
        browser = launch(p)
        for source, target in ((index, "index.png"), (page, "report.png")):
            shown = visit(browser, source)
            shown.page.screenshot(path=str(ROOT / "docs" / target), full_page=True)
            print(ROOT / "docs" / target)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
