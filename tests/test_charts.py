"""lib/charts.py: the index's trend pictures, drawn from run summaries; their axes start where a
reader expects."""

from __future__ import annotations

from lib import charts, review


def summary(n: int, quarantined: int) -> dict:
    rows = {layer: 250 - quarantined for layer in review.LAYERS.values()}
    rows["raw"] = 250
    return {"run_id": f"20261128T05{n:02d}00Z-a1b2c{n}", "started": f"2026-11-28T05:{n:02d}:00.000+00:00",
            "rows": rows, "quarantined": quarantined, "stage_seconds": {s: 1.0 for s in review.LAYERS},
            "by_region": {"Europe": 7.4e8 + n, "Asia": 4.6e9 + n}}


def test_row_counts_start_at_zero_so_one_quarantined_row_is_a_small_step():
    runs = [summary(1, 0), summary(2, 1), summary(3, 0)]
    fig = charts.figure("rows", runs)
    top, bottom = fig.axes
    assert top.get_ylim()[0] == 0 and top.get_ylim()[1] >= 250
    assert bottom.get_ylim()[0] == 0


def test_population_starts_at_zero():
    fig = charts.figure("regions", [summary(1, 0), summary(2, 0)])
    assert fig.axes[0].get_ylim()[0] == 0


def test_write_draws_every_picture_with_data(tmp_path):
    shown = charts.write(list(reversed([summary(1, 0), summary(2, 1)])), tmp_path)
    assert shown == charts.FILES and all((tmp_path / f).stat().st_size > 1000 for f in shown.values())
