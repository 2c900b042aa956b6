"""Full disks fail cleanly: outputs/ or logs/ on a small tmpfs end a run with exit 1 and one clear
message (no traceback), no partial file, nothing published and a true record; `--resume` with room
again completes the run, pages included. Mounting a tmpfs needs root, as CI runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from lib import publish, registry, runs
from tests.e2e.test_faults import children, finish, is_kernel, kill, start_runner, wait_until


@pytest.fixture
def small_disk():
    """A tmpfs of 320 KiB: a few hundred KiB free."""
    point = Path(tempfile.mkdtemp(prefix="medallion-small-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k,mode=0755", "tmpfs", str(point)], check=True)
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)
    point.rmdir()


def grow(point: Path, size: str = "64m") -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)


def assert_whole_files(folder: Path) -> None:
    """No temporary file left, and every record, notebook and page that exists is whole."""
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    for path in folder.rglob("*"):
        if path.suffix in (".json", ".ipynb"):
            json.loads(path.read_text(encoding="utf-8"))  # a file cut off is no JSON
        elif path.suffix == ".html":
            assert path.read_text(encoding="utf-8").rstrip().endswith("</html>"), path


def assert_one_clear_message(res_or_err: str) -> None:
    assert "Traceback" not in res_or_err, res_or_err[-3000:]


def assert_nothing_published(settings, s3, table: str) -> None:
    assert publish.pointer(s3, settings.gold_bucket, table) is None


@pytest.mark.parametrize("folder", ["PIPELINE_OUTPUTS_DIR", "PIPELINE_LOGS_DIR"])
def test_a_small_disk_fails_the_run_before_it_starts_then_resume_completes(run_pipeline, settings, s3, unique,
                                                                         small_disk, folder, session_dirs):
    run_id, table = f"small-{unique}", f"small_{unique}"
    env = {folder: str(small_disk)}
    outputs = small_disk if folder == "PIPELINE_OUTPUTS_DIR" else session_dirs["outputs"]
    res = run_pipeline("--run-id", run_id, "-p", f"table={table}", env=env, timeout=300)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert_one_clear_message(res.stdout + res.stderr)
    assert f"not enough free space in {small_disk} ({folder})" in res.stderr
    assert f"--resume {run_id}" in res.stderr
    manifest = runs.read_json(runs.manifest_path(outputs, run_id))
    assert manifest["status"] == "failed" and "free space" in manifest["preflight"][0]
    assert not (runs.run_dir(outputs, run_id) / runs.RESERVE_FILE).exists()
    assert_whole_files(small_disk)
    assert_nothing_published(settings, s3, table)

    grow(small_disk)
    res = run_pipeline("--resume", run_id, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    manifest = runs.read_json(runs.manifest_path(outputs, run_id))
    assert manifest["status"] == "succeeded" and "preflight" not in manifest
    rdir = runs.run_dir(outputs, run_id)
    assert (rdir / "report.html").exists() and all((rdir / f"{s}.html").exists() for s in registry.NAMES)
    assert publish.pointer(s3, settings.gold_bucket, table)["run_id"] == run_id


def _fill(point: Path) -> Path:
    """Take every free byte of a tmpfs."""
    filler = point / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as fh:
        try:
            while fh.write(chunk):
                pass
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("folder", ["PIPELINE_OUTPUTS_DIR", "PIPELINE_LOGS_DIR"])
def test_a_disk_filling_during_a_stage_fails_with_a_true_record_then_resume_completes(settings, s3, unique, folder,
                                                                                      small_disk, run_pipeline,
                                                                                      session_dirs):
    """The free-space check passed, then something else filled the disk while stage 3 ran: the
    stage fails, the record says why (on the outputs disk: written in the space the run reserved),
    nothing is published, and `--resume` completes once there is room."""
    grow(small_disk, "24m")
    run_id, table = f"filled-{unique}", f"filled_{unique}"
    env = {folder: str(small_disk)}
    outputs = small_disk if folder == "PIPELINE_OUTPUTS_DIR" else session_dirs["outputs"]
    proc = start_runner("--run-id", run_id, "-p", f"table={table}", env=env)
    stage = "03_load"
    path = runs.stage_path(outputs, run_id, stage)
    try:
        # Looked at every 10 ms: a 250-record stage runs for well under a second.
        wait_until(lambda: (runs.read_json(path) or {}).get("status") == "running" or proc.poll() is not None,
                   180, f"{stage} starting", interval=0.01)
        kernels = [pid for pid, cmd in children(proc.pid).items() if is_kernel(cmd)]
        for pid in kernels:
            os.kill(pid, signal.SIGSTOP)
        filler = _fill(small_disk)
        for pid in kernels:
            os.kill(pid, signal.SIGCONT)
        out, err = finish(proc, 180)
    finally:
        if proc.poll() is None:
            kill(proc)
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert_one_clear_message(out + err)
    assert "FAILED in" in err and "no space left" in err.lower()
    assert_whole_files(small_disk)
    manifest = runs.read_json(runs.manifest_path(outputs, run_id))
    assert manifest["status"] == "failed"
    # The stage that wrote first after the disk filled failed (stage 3, or a later one that logs).
    failed = [s for s, e in manifest["stages"].items() if e["status"] == "failed"]
    assert len(failed) == 1 and failed[0] >= stage, manifest["stages"]
    assert "space" in manifest["stages"][failed[0]]["error"].lower()
    assert_nothing_published(settings, s3, table)

    filler.unlink()
    res = run_pipeline("--resume", run_id, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    manifest = runs.read_json(runs.manifest_path(outputs, run_id))
    assert manifest["status"] == "succeeded"
    assert [a["status"] for a in manifest["stages"][failed[0]]["attempts"]] == ["failed"]
    rdir = runs.run_dir(outputs, run_id)
    assert (rdir / "report.html").exists() and all((rdir / f"{s}.html").exists() for s in registry.NAMES)
    assert publish.pointer(s3, settings.gold_bucket, table)["run_id"] == run_id
