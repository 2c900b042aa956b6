"""bench/: the benchmark script runs end to end on real services and prints its figures against
their targets (the figures themselves are never asserted: they belong to the machine)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import BENCH_PORT_BASE, ROOT


def test_the_benchmark_runs_and_prints_each_figure_beside_its_target(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    res = subprocess.run(
        [sys.executable, "-m", "bench.benchmark", "--only", "pipeline", "--max-records", "250", "--repeats", "1",
         "--port-base", str(BENCH_PORT_BASE), "--results", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "1. 250 records" in out and "2. scale" in out
    for stage in ("01_ingest", "02_clean", "03_load", "04_export"):
        assert stage in out
    assert out.count(" ok") + out.count("OVER") >= 3
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_measure_counts_the_memory_and_cpu_of_a_child_started_later():
    """The sampler looks the process tree up now and then: a child started after the run began (as
    the runner's kernel is) is still counted in the peak, and its CPU once it is reaped."""
    from bench import pipeline

    code = ("import subprocess, sys, time\n"
            "held = bytearray(150 * 2**20)\n"
            "time.sleep(0.3)\n"
            "child = ('import time\\nheld = bytearray(200 * 2**20)\\nend = time.process_time() + 0.5\\n'\n"
            "         'while time.process_time() < end: pass\\ntime.sleep(1.5)')\n"
            "subprocess.run([sys.executable, '-c', child], check=True)\n")
    m = pipeline.measure([sys.executable, "-c", code], dict(os.environ))
    assert m.code == 0, m.out
    assert m.peak_rss >= 340 * 2**20  # both processes' bytearrays at once
    assert m.cpu >= 0.5  # the child's busy half second, reaped through the parent
