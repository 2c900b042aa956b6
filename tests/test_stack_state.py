"""lib.stack_state: the embedded stack's state folder, its files and the credentials it holds."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import psutil

from lib import stack_state
from lib.config import ROOT


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_credentials_and_ports_files_are_private(sdir):
    assert mode(sdir / "credentials.json") == 0o600
    assert mode(sdir / "stack.json") == 0o600
    assert mode(sdir) & 0o066 == 0  # nobody else may list or write the state folder


def test_state_files_hold_what_read_state_returns(sdir, embedded):
    state = stack_state.read_state(sdir)
    assert state == embedded
    assert state.s3_url == f"http://127.0.0.1:{state.port_base}"
    assert state.pg_port == state.port_base + 5


def test_init_state_creates_fresh_private_credentials_once(tmp_path):
    first = stack_state.init_state(tmp_path / "a", port_base=19200)
    assert stack_state.init_state(tmp_path / "a", port_base=19300) == first  # existing state is kept
    other = stack_state.init_state(tmp_path / "b", port_base=19200)
    assert first.port_base == 19200
    assert {first.secret_key, first.db_password}.isdisjoint({other.secret_key, other.db_password})
    assert len(first.secret_key) >= 30 and first.access_key.startswith("medallion-")
    assert mode(tmp_path / "a" / "credentials.json") == 0o600
    # 0700; as root 0710 with group pgserver, so the PostgreSQL system user can pass through
    assert mode(tmp_path / "a") == (0o710 if os.geteuid() == 0 else 0o700)


# --- every port and socket: declared once, documented, and nothing else listens ---------------------------

def documented() -> tuple[set[int], set[str]]:
    """The port offsets (from the base) and the Unix sockets that docs/stack.md's two tables name."""
    offsets, sockets = set(), set()
    for line in (ROOT / "docs" / "stack.md").read_text(encoding="utf-8").splitlines():
        if found := re.match(r"\| base \+(\d+)(?: … \+(\d+))? \|", line):
            offsets |= set(range(int(found[1]), int(found[2] or found[1]) + 1))
        elif found := re.match(r"\| `([^`]+\.sock)` \|", line):
            sockets.add(found[1])
    return offsets, sockets


def declared_offsets() -> set[int]:
    weed = {off for name, off in stack_state.PORT_OFFSETS.items() if name != "postgres"}
    return set(stack_state.PORT_OFFSETS.values()) | {off + stack_state.GRPC_OFFSET for off in weed}


def test_the_docs_tables_name_every_declared_port_and_socket_and_no_other(tmp_path):
    sockets = stack_state.weed_sockets(tmp_path, 0)
    as_documented = {str(path.relative_to(tmp_path)) if path.is_relative_to(tmp_path)
                     else stack_state.GRPC_SOCKET.format(name="<name>", port="<port>") for path in sockets.values()}
    assert documented() == (declared_offsets(), as_documented)


def listening(pids: set[int]) -> tuple[set[int], set[Path]]:
    """The TCP ports and Unix socket paths these processes listen on, read from the system."""
    out = subprocess.run(["ss", "-lHpxt"], capture_output=True, text=True, check=True).stdout
    ports, paths = set(), set()
    for line in out.splitlines():
        if not any(f"pid={pid}," in line for pid in pids):
            continue
        local = line.split()[4]
        if line.startswith("u_"):
            paths.add(Path(local))
        else:
            ports.add(int(local.rsplit(":", 1)[1]))
    return ports, paths


def test_every_socket_the_stack_listens_on_is_declared(sdir, embedded):
    weed = int((sdir / "seaweedfs" / "weed.pid").read_text())
    postmaster = psutil.Process(int((sdir / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[0]))
    ports, paths = listening({weed, postmaster.pid, *(c.pid for c in postmaster.children(recursive=True))})
    assert {embedded.s3_port, embedded.pg_port} <= ports
    assert {p - embedded.port_base for p in ports} <= declared_offsets()
    sockets = set(stack_state.weed_sockets(sdir, embedded.port_base).values())
    assert {sdir / "seaweedfs" / "s3.sock", sdir / "seaweedfs" / "filer.sock"} <= paths <= sockets
