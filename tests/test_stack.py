"""lib.stack: the embedded SeaweedFS + PostgreSQL servers the session runs on: starting, stopping, status."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from lib import config, stack, stack_ports, stack_state, storage
from lib.stack_state import StackError
from tests.conftest import ORPHAN_BASE


def stack_pids(sdir: Path) -> dict[str, int]:
    weed = int((sdir / "seaweedfs" / "weed.pid").read_text())
    postmaster = int((sdir / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[0])
    return {"weed": weed, "postgres": postmaster}


def listening(pid: int) -> list[str]:
    """Local addresses of every listening TCP socket (IPv4 and IPv6) of one process."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if re.search(rf"pid={pid},", line)]


def test_status_reports_both_services_running(sdir, embedded):
    status = stack.status(sdir)
    assert status["initialised"] is True and "ports_held_by" not in status  # its own servers are no others
    assert status["object_store"] == {"endpoint": embedded.s3_url, "running": True}
    assert status["database"] == {"endpoint": f"127.0.0.1:{embedded.pg_port}/{embedded.db_name}",
                                  "running": True}


def test_every_listening_socket_of_the_stack_is_on_loopback(sdir, embedded):
    pids = stack_pids(sdir)
    weed, postgres = listening(pids["weed"]), listening(pids["postgres"])
    assert f"127.0.0.1:{embedded.s3_port}" in weed
    assert f"127.0.0.1:{embedded.pg_port}" in postgres
    for address in weed + postgres:
        assert address.startswith("127.0.0.1:"), f"{address} is reachable from outside this machine"


def test_env_lines_are_shell_exports_of_the_stack(sdir, embedded):
    lines = stack.env_lines(sdir)
    assert all(line.startswith("export ") for line in lines)
    script = "\n".join(lines) + '\nprintf "%s|%s|%s|%s" "$MINIO_URL" "$AWS_SECRET_ACCESS_KEY" "$PGPORT" "$PGPASSWORD"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env={}).stdout
    assert out == f"{embedded.s3_url}|{embedded.secret_key}|{embedded.pg_port}|{embedded.db_password}"


def test_the_store_is_ready_only_when_a_write_and_a_read_with_the_pipelines_keys_succeed(sdir, embedded):
    # weed keeps the keys it was started with: a state folder whose keys no longer match is not ready,
    # though the gateway answers every request (403).
    creds = sdir / "credentials.json"
    saved = creds.read_text()
    stack_state.write_private(creds, {**json.loads(saved), "secret_key": "not-the-key-weed-was-started-with"})
    try:
        with pytest.raises(StackError) as refused:
            stack.start_object_store(sdir, stack_state.read_state(sdir), timeout=2)
    finally:
        stack_state.write_text_private(creds, saved)
    message = str(refused.value)
    assert "SeaweedFS did not serve within 2s" in message and embedded.s3_url in message
    assert re.search(rf"(checking the bucket|writing \S+) failed on {embedded.s3_url} bucket '{stack.READY_BUCKET}': "
                     r".*(403|SignatureDoesNotMatch|AccessDenied)", message)
    assert f"see {sdir / 'seaweedfs' / 'weed.log'}" in message and "not-the-key" not in message
    stack.start_object_store(sdir, embedded)  # the right keys: ready again


def test_a_restarted_store_serves_a_read_as_soon_as_up_returns(sdir, embedded, s3, unique):
    bucket = f"restart-{unique}"
    storage.ensure_bucket(s3, bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"before the restart")
    once = storage.client(config.embedded_store(embedded), probe=True)  # one try: no retry hides a failure
    for _ in range(2):
        stack.down(sdir, ("object_store",))
        stack.up(sdir, ("object_store",))
        assert storage.get_bytes(once, bucket, "k")[0] == b"before the restart"


def open_to_others(sdir: Path) -> list[str]:
    """Every file or folder of the state folder that anyone but its owner may read, write or enter. As
    root, the state folder and postgres/ let group pgserver pass (search only, docs/stack.md)."""
    passable = {sdir, sdir / "postgres"} if os.geteuid() == 0 else set()
    found = []
    for path in [sdir, *sdir.rglob("*")]:
        try:
            info = path.lstat()
        except FileNotFoundError:  # a server's temporary file, gone meanwhile
            continue
        if stat.S_ISLNK(info.st_mode):  # a link's own mode bits mean nothing (weed's log links)
            continue
        mode, allowed = stat.S_IMODE(info.st_mode), 0o010 if path in passable else 0
        if mode & 0o077 & ~allowed:
            found.append(f"{mode:04o} {path.relative_to(sdir)}")
    return found


def test_every_file_of_a_running_stack_is_its_owners_alone(sdir, embedded, s3, unique):
    # A new bucket: weed makes a volume for it and sets its volume info file (.vif) to 0644 itself.
    storage.ensure_bucket(s3, f"private-{unique}")
    s3.put_object(Bucket=f"private-{unique}", Key="k", Body=b"v")
    stack.up(sdir)  # as every run does
    assert open_to_others(sdir) == []


def test_weed_writes_its_log_files_in_the_state_folder_not_in_tmp(sdir, embedded):
    weed = stack_pids(sdir)["weed"]
    # glog's name for them: weed.<host>.<user>.log.<SEVERITY>.<date>-<time>.<pid>, by default in $TMPDIR
    assert not [p for p in Path(tempfile.gettempdir()).glob(f"weed.*.log.*.{weed}")]
    assert list((sdir / "seaweedfs" / "logs").glob(f"weed.*.log.INFO.*.{weed}"))


def test_up_again_reuses_the_running_servers(sdir, embedded):
    before = stack_pids(sdir)
    assert stack.up(sdir) == embedded
    assert stack_pids(sdir) == before


def test_describe_shows_no_credentials(embedded):
    described = stack.describe(embedded)
    assert described == {"port_base": embedded.port_base, "db_user": embedded.db_user, "db_name": embedded.db_name}


def test_a_port_taken_by_another_program_is_refused_with_a_hint(tmp_path, embedded):
    other = stack_state.init_state(tmp_path / "other", port_base=embedded.port_base)
    with pytest.raises(StackError, match="taken by another program.*PIPELINE_STACK_PORT_BASE"):
        stack.start_object_store(tmp_path / "other", other)
    assert not (tmp_path / "other" / "seaweedfs" / "weed.pid").exists()


def test_read_state_of_an_empty_folder_is_none(tmp_path):
    assert stack_state.read_state(tmp_path) is None
    assert stack.status(tmp_path, others=[]) == {"state_dir": str(tmp_path), "initialised": False}
    with pytest.raises(StackError, match="stack up"):
        stack.env_lines(tmp_path)


def test_weed_is_told_to_bind_loopback_only(tmp_path):
    state = stack_state.init_state(tmp_path, port_base=19400)
    command = stack.weed_command(tmp_path, state)
    assert "-ip.bind=127.0.0.1" in command and "-s3.port=19400" in command


# --- stubborn servers ---------------------------------------------------------------------------------

def test_down_kills_a_weed_that_ignores_sigterm(tmp_path):
    sdir = tmp_path / ".state"
    state = stack_state.init_state(sdir, port_base=ORPHAN_BASE + 20)
    stack.up(sdir, ("object_store",))
    pid = int((sdir / "seaweedfs" / "weed.pid").read_text())
    os.kill(pid, signal.SIGSTOP)  # a stopped process does not act on SIGTERM; SIGKILL still ends it
    try:
        stack.down(sdir, ("object_store",))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert stack_ports.holders(state.port_base) == []
    assert not (sdir / "seaweedfs" / "weed.pid").exists()
    left = [p for p in stack_state.weed_sockets(sdir, state.port_base).values() if p.exists()]
    assert left == []  # the socket files a killed weed leaves, in /tmp too


def test_up_restarts_a_weed_started_without_the_security_configuration(tmp_path):
    sdir = tmp_path / ".state"
    state = stack_state.init_state(sdir, port_base=ORPHAN_BASE + 30)
    (sdir / "seaweedfs").mkdir()
    # As the previous version started it: no -config_dir, so no security.toml.
    old = [arg for arg in stack.weed_command(sdir, state) if not arg.startswith(("-config_dir=", "-disableHttp"))]
    with open(sdir / "seaweedfs" / "weed.log", "ab") as log:
        proc = subprocess.Popen(old, cwd=sdir / "seaweedfs", stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (sdir / "seaweedfs" / "weed.pid").write_text(str(proc.pid))
    try:
        stack._wait_for(lambda: stack._port_open(state.port_base + 3), "old filer", 60, sdir / "seaweedfs" / "weed.log")
        stack.up(sdir, ("object_store",))
        assert proc.wait(timeout=30) is not None  # the insecure weed is gone ...
        new = int((sdir / "seaweedfs" / "weed.pid").read_text())
        assert new != proc.pid and b"-config_dir=" in Path(f"/proc/{new}/cmdline").read_bytes()
        import requests  # ... and its filer no longer answers strangers
        with pytest.raises(requests.RequestException):
            requests.get(f"http://127.0.0.1:{state.port_base + 3}/", timeout=5).raise_for_status()
    finally:
        stack.down(sdir)
        if proc.poll() is None:
            proc.kill()
