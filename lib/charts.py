"""Trend pictures for the run index (PNG files beside `outputs/index.html`), drawn with matplotlib."""

from __future__ import annotations

import io
from pathlib import Path

from lib import files
from lib.review import LAYERS

FILES = {"rows": "trend-rows.png", "durations": "trend-durations.png", "regions": "trend-regions.png"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


MAX_LABELS = 12  # tick labels side by side on a 9-inch chart before they run into each other


def _labels(rows: list[dict]) -> list[str]:
    """A label under every run's tick, or under every k-th counted from the newest when more would
    overlap: "11-28 05:54" and the run id's end read better than a 20-character run id."""
    step = -(-len(rows) // MAX_LABELS)
    return [f"{(s['started'] or '')[5:16].replace('T', ' ')}\n{s['run_id'][-6:]}"
            if (len(rows) - 1 - i) % step == 0 else "" for i, s in enumerate(rows)]


def _xticks(ax, rows: list[dict]) -> None:
    """Ticks only under the runs that get a label: a tick is a handful of artists, and 30 of them per
    axis were a third of the time the pictures took to draw."""
    at = [(i, label) for i, label in enumerate(_labels(rows)) if label]
    ax.set_xticks([i for i, _ in at], [label for _, label in at], fontsize=7)
    ax.set_xlim(-0.6, len(rows) - 0.4)


def _save(fig, path: Path) -> None:
    # Fixed margins that fit the axis labels and the two-line tick labels: tight_layout measured them
    # with a whole draw of its own before the one that writes the file (~0.1 s a chart).
    fig.subplots_adjust(left=0.08, right=0.985, top=0.9, bottom=0.2 if fig.get_figheight() < 4.5 else 0.13,
                        hspace=0.12)
    picture = io.BytesIO()
    fig.savefig(picture, dpi=90, format=path.suffix.lstrip(".") or "png")
    _pyplot().close(fig)
    files.write(path, picture.getvalue())


def _rows(top, bottom, runs: list[dict]) -> None:
    x = range(len(runs))
    for layer in LAYERS.values():
        top.plot(x, [s["rows"][layer] if s["rows"][layer] is not None else float("nan") for s in runs],
                 marker="o", label=layer)
    top.set_ylim(bottom=0)  # counts from 0: one quarantined row of 250 is a small step, not a cliff
    top.set_ylabel("rows")
    top.legend(loc="lower left", ncol=5, fontsize=8)
    top.set_title("Rows at each layer, and records quarantined, per run")
    bottom.bar(x, [s["quarantined"] or 0 for s in runs], color="#c44e52")
    bottom.set_ylabel("quarantined")


def _durations(ax, runs: list[dict]) -> None:
    x, bottom = range(len(runs)), [0.0] * len(runs)
    for stage in LAYERS:
        values = [s["stage_seconds"].get(stage) or 0.0 for s in runs]
        ax.bar(x, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds")
    ax.set_title("Stage durations per run")
    ax.legend(fontsize=8, ncol=5, loc="upper left")


def _regions(ax, runs: list[dict]) -> None:
    x = range(len(runs))
    for region in sorted({r for s in runs for r in s["by_region"]}):
        ax.plot(x, [s["by_region"].get(region, float("nan")) / 1e9 for s in runs], marker="o", label=region)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("population (billions)")
    ax.set_title("Population by region, per run (gold)")
    ax.legend(fontsize=8, ncol=3, loc="upper left")


# Each picture: the runs it needs, how it is laid out, and what draws it on its axes.
PICTURES = {
    "rows": (lambda s: any(v is not None for v in s["rows"].values()),
             {"nrows": 2, "figsize": (9, 5), "sharex": True, "height_ratios": [3, 1.3]}, _rows),
    "durations": (lambda s: s["stage_seconds"], {"figsize": (9, 3.6)}, _durations),
    "regions": (lambda s: s["by_region"], {"figsize": (9, 3.6)}, _regions),
}


def write(summaries: list[dict], folder: Path, last: int = 30) -> dict[str, str | None]:
    """Draw the trends of the newest `last` runs, oldest on the left. Returns picture name → file name
    (None when no run has the data yet, and any old file of that name is removed)."""
    chosen = list(reversed(summaries[:last]))
    out: dict[str, str | None] = {}
    for name, (wanted, *_) in PICTURES.items():
        runs = [s for s in chosen if wanted(s)]
        if not runs:
            (folder / FILES[name]).unlink(missing_ok=True)
            out[name] = None
            continue
        _save(figure(name, runs), folder / FILES[name])
        out[name] = FILES[name]
    return out


def figure(name: str, runs: list[dict]):
    """Picture `name` of PICTURES drawn for `runs` (oldest first, each with its data), not yet saved."""
    _, layout, draw = PICTURES[name]
    fig, axes = _pyplot().subplots(**layout)
    draw(*(axes if layout.get("nrows", 1) > 1 else [axes]), runs)
    _xticks(axes[-1] if layout.get("nrows", 1) > 1 else axes, runs)
    return fig
