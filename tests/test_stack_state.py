"""lib.stack_state: the embedded stack's state folder, its files and the credentials it holds."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lib import stack_state


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
