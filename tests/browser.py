"""A real headless Chromium (the OS package, /usr/bin/chromium) driven through Playwright's Python API,
for the page tests and `make screenshots`. `make test` installs Chromium with apt-get when missing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def launch(playwright):
    if not CHROMIUM.exists():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: `make test` installs it (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)


@dataclass
class Visit:
    page: object
    path: Path
    errors: list[str] = field(default_factory=list)

    def text(self) -> str:
        return self.page.inner_text("body")

    def links(self) -> list[str]:
        """Every href/src on the page (links, pictures, stylesheets)."""
        return self.page.eval_on_selector_all(
            "a[href], img[src], link[href], script[src]",
            "els => els.map(e => e.getAttribute('href') || e.getAttribute('src'))")

    def local_targets(self) -> list[tuple[str, Path]]:
        """Relative links as (link, file path) pairs; fragments, data: URIs and web links left out."""
        out = []
        for link in self.links():
            parsed = urlparse(link)
            if not parsed.path or parsed.scheme in ("data", "http", "https", "mailto"):
                continue
            out.append((link, (self.path.parent / unquote(parsed.path)).resolve()))
        return out


def visit(browser, path: Path, width: int = 1400, height: int = 900) -> Visit:
    """Open a file in a new page of a `width` x `height` window; console errors and uncaught
    exceptions are collected."""
    page = browser.new_page(viewport={"width": width, "height": height})
    found = Visit(page, path)
    page.on("console", lambda m: found.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda err: found.errors.append(str(err)))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return found
