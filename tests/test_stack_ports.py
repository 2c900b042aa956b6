"""lib.stack_ports: who holds the stack's ports, and stopping an orphaned stack safely."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from lib import hints, stack, stack_ports, stack_state
from lib.stack_state import StackError
from tests.conftest import ORPHAN_BASE, ROOT


def test_an_orphaned_stack_is_named_and_stopped_safely(stack_tmp, run_pipeline):
    gone = stack_tmp / "deleted-clone" / ".state"
    stack_state.init_state(gone, port_base=ORPHAN_BASE)
    stack.up(gone)
    weed = int((gone / "seaweedfs" / "weed.pid").read_text())
    (gone / "stack.json").unlink()  # its clone is gone: what marks a stack orphaned (its data may stay)
    fresh = stack_tmp / "new-clone" / ".state"
    stack_state.init_state(fresh, port_base=ORPHAN_BASE)
    with pytest.raises(StackError) as refused:
        stack.up(fresh)
    message = str(refused.value)
    assert "taken by another program" in message and f"pid {weed} " in message
    assert f"state folder {gone} (deleted" in message and "stack down --orphans" in message
    env = {"PIPELINE_STATE_DIR": str(fresh), "PIPELINE_STACK_PORT_BASE": str(ORPHAN_BASE)}
    down = run_pipeline("stack", "down", env=env)  # the new clone's own stack: nothing to stop ...
    assert down.returncode == 1 and "still listening" in down.stderr and f"pid {weed} " in down.stderr
    printed = re.search(r"stop an orphaned stack with `([^`]+)`", message).group(1)
    orphans = subprocess.run(["bash", "-c", printed], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)  # the hint, run as printed
    assert orphans.returncode == 0, orphans.stderr
    assert f"stopped pid {weed} " in orphans.stdout
    assert stack_ports.holders(ORPHAN_BASE) == []
    try:
        assert stack.up(fresh).port_base == ORPHAN_BASE  # the ports are free again
    finally:
        stack.down(fresh)


def test_stop_orphans_leaves_live_stacks_and_other_programs_alone(sdir, embedded):
    with pytest.raises(StackError, match="not provably an orphaned stack"):
        stack_ports.stop_orphans(embedded.port_base)
    assert stack.status(sdir)["object_store"]["running"] and stack.status(sdir)["database"]["running"]
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", ORPHAN_BASE + 3))
        other.listen()
        with pytest.raises(StackError, match=rf"not provably.*pid {os.getpid()} "):
            stack_ports.stop_orphans(ORPHAN_BASE)
        state = stack_state.init_state(Path(tempfile.mkdtemp(prefix="medallion-busy-")), port_base=ORPHAN_BASE)
        with pytest.raises(StackError, match=rf"taken by another program \(pid {os.getpid()} "):
            stack.start_object_store(Path(tempfile.mkdtemp(prefix="medallion-busy-")), state)


def test_status_names_an_orphaned_stack_and_the_command_that_stops_it(stack_tmp, run_pipeline):
    base = ORPHAN_BASE + 50
    gone = stack_tmp / "deleted-clone" / ".state"
    stack_state.init_state(gone, port_base=base)
    stack.up(gone, ("object_store",))
    weed = int((gone / "seaweedfs" / "weed.pid").read_text())
    (gone / "stack.json").unlink()  # its clone is gone: what marks a stack orphaned (its data may stay)
    env = {"PIPELINE_STATE_DIR": str(stack_tmp / "new-clone" / ".state"), "PIPELINE_STACK_PORT_BASE": str(base)}
    try:
        status = run_pipeline("stack", "status", env=env)
        assert status.returncode == 0, status.stderr
        reported = json.loads(status.stdout)
        assert reported["initialised"] is False
        [holder] = reported["ports_held_by"]
        assert holder["pid"] == weed and holder["orphaned"] is True and holder["state_dir"] == str(gone)
        assert base in holder["ports"]
        assert f"pid {weed} " in status.stderr and "orphaned" in status.stderr
        command = reported["stop_orphans"]
        assert command in status.stderr
        # The command as printed, run from the project folder (lib/hints.py spells it).
        assert command == hints.command("stack", "down", "--orphans")
        stopped = subprocess.run(shlex.split(command), cwd=ROOT, env={**os.environ, **env},
                                 capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0 and f"stopped pid {weed} " in stopped.stdout, stopped.stderr
        again = json.loads(run_pipeline("stack", "status", env=env).stdout)
        assert "ports_held_by" not in again and "stop_orphans" not in again
    finally:
        stack_ports.stop_orphans(base)
