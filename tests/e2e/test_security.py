"""Nobody gets into the embedded stack without its credentials.

The listening sockets are read from the system (psutil, by the pids of the stack's process trees), not
from a list of ports in the code, so a port that a new SeaweedFS version opens is probed too.

What "refuses" means, port by port:
- the S3 API answers every unsigned request with 403 and changes nothing;
- PostgreSQL refuses a connection without a password or with a wrong one;
- every other port (SeaweedFS master, volume, filer and admin, HTTP and gRPC alike) speaks TLS and
  demands a client certificate signed by the stack's own CA: without one the server aborts the
  handshake (TLS alert "certificate required") before a single HTTP or gRPC byte is exchanged, and a
  plain HTTP or h2c request gets an error or a closed connection. The same probe WITH the stack's
  certificate gets an HTTP or HTTP/2 answer, which shows the refusal comes from the missing
  certificate and not from a dead port.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import uuid
from pathlib import Path

import psutil
import psycopg2
import pytest
import requests

from lib import stack, stack_state
from tests.conftest import MIGRATION_PORT_BASE

SECRET_BODY = b"probe-" + uuid.uuid4().hex.encode()


def stack_listeners(sdir: Path) -> list:
    """Every listening TCP socket of the stack's processes (weed and the postmaster, with children)."""
    roots = [int((sdir / "seaweedfs" / "weed.pid").read_text()),
             int((sdir / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[0])]
    pids = set()
    for root in roots:
        proc = psutil.Process(root)
        pids |= {proc.pid, *(child.pid for child in proc.children(recursive=True))}
    return [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]


def tls_exchange(port: int, tls_dir: Path | None) -> bytes | str:
    """A TLS handshake, with the stack's client certificate or without any, then one request (HTTP/1.1,
    or the HTTP/2 preface when the server picks h2, as gRPC does). Returns the first bytes of the answer,
    or a string naming why there was none."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    if tls_dir is not None:
        ctx.load_cert_chain(tls_dir / "weed.crt", tls_dir / "weed.key")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as conn:
                if conn.selected_alpn_protocol() == "h2":
                    conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                else:
                    conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                return conn.recv(64) or "connection closed"
    except (ssl.SSLError, ConnectionError, socket.timeout) as err:
        return f"refused: {err}"


def plain_http(port: int, bucket: str, key: str) -> list[tuple[str, object]]:
    """Unauthenticated GET, POST (multipart upload), PUT and DELETE on the object's paths."""
    answers = []
    for path in (f"/buckets/{bucket}/{key}", f"/{bucket}/{key}", f"/buckets/{bucket}/", "/dir/assign"):
        url = f"http://127.0.0.1:{port}{path}"
        for method, kwargs in (("GET", {}), ("POST", {"files": {"file": ("x", b"intruder")}}),
                               ("PUT", {"data": b"intruder"}), ("DELETE", {})):
            try:
                r = requests.request(method, url, timeout=5, allow_redirects=False, **kwargs)
                answers.append((f"{method} {path}", r))
            except requests.RequestException as err:
                answers.append((f"{method} {path}", f"refused: {type(err).__name__}"))
    return answers


def test_every_listening_socket_is_on_loopback_and_refuses_strangers(session_dirs, embedded, s3):
    sdir = session_dirs["state"]
    bucket, key = f"probe-{uuid.uuid4().hex[:8]}", "secret/object.csv"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=SECRET_BODY)
    listeners = stack_listeners(sdir)
    ports = {c.laddr.port for c in listeners}
    assert {embedded.s3_port, embedded.pg_port} <= ports
    postmaster = int((sdir / "postgres" / "data" / "postmaster.pid").read_text().splitlines()[0])
    tls_dir = sdir / "seaweedfs" / "config" / "tls"
    for conn in listeners:
        port = conn.laddr.port
        assert conn.laddr.ip == "127.0.0.1", f"port {port} listens on {conn.laddr.ip}, not loopback only"
        if conn.pid == postmaster:
            for password in (None, "wrong-" + uuid.uuid4().hex):
                with pytest.raises(psycopg2.OperationalError, match="password"):
                    psycopg2.connect(host="127.0.0.1", port=port, user=embedded.db_user, password=password,
                                     dbname=embedded.db_name, connect_timeout=5)
            continue
        for what, answer in plain_http(port, bucket, key):
            if isinstance(answer, str):
                continue  # no HTTP answer at all
            assert answer.status_code in (400, 401, 403, 404, 405), f"port {port}: {what} -> {answer.status_code}"
            assert SECRET_BODY not in answer.content
        if port == embedded.s3_port:
            assert requests.get(f"{embedded.s3_url}/{bucket}/{key}", timeout=5).status_code == 403
            continue
        refused = tls_exchange(port, None)
        assert isinstance(refused, str), f"port {port} answered without a client certificate: {refused!r}"
        answered = tls_exchange(port, tls_dir)
        assert isinstance(answered, bytes), f"port {port} does not answer even with the stack's certificate: {answered}"
    # Nothing was written, changed or deleted by any of the probes.
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == SECRET_BODY
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [key]


def test_the_s3_api_still_serves_its_keys(s3):
    bucket = f"probe-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
    s3.delete_object(Bucket=bucket, Key="k")
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


def test_security_config_is_private_and_holds_no_default_keys(session_dirs):
    cdir = session_dirs["state"] / "seaweedfs" / "config"
    text = (cdir / "security.toml").read_text()
    creds = json.loads((session_dirs["state"] / "credentials.json").read_text())
    for name in stack_state.WEED_KEYS:
        assert len(creds[name]) >= 32 and json.dumps(creds[name]) in text
    for path in [cdir / "security.toml", *(cdir / "tls").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


# --- PostgreSQL: least privilege ---------------------------------------------------------------------

def test_the_pipeline_role_owns_its_database_and_nothing_more(pg, embedded):
    with pg.cursor() as cur:
        cur.execute("SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls "
                    "FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone() == (False, False, False, False, False)
        cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
        assert cur.fetchone()[0] == embedded.db_user
        cur.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'")
        assert cur.fetchone()[0] == embedded.db_user
        for statement in ("CREATE TABLE information_schema.intruder (x int)",
                          "CREATE TABLE pg_catalog.intruder (x int)",
                          "CREATE ROLE intruder", "CREATE DATABASE intruder",
                          "ALTER ROLE current_user SUPERUSER", "COPY (SELECT 1) TO PROGRAM 'true'"):
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute(statement)


def test_the_administrator_is_separate_and_its_password_private(session_dirs, embedded):
    sdir = session_dirs["state"]
    admin = json.loads((sdir / "stack.json").read_text())["db_admin"]
    creds = json.loads((sdir / "credentials.json").read_text())
    assert admin != embedded.db_user and creds["db_admin_password"] != embedded.db_password
    conn = psycopg2.connect(host="127.0.0.1", port=embedded.pg_port, user=admin,
                            password=creds["db_admin_password"], dbname="postgres", connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone()[0] is True
    finally:
        conn.close()
    with pytest.raises(psycopg2.OperationalError, match="password"):  # not with the pipeline's password
        psycopg2.connect(host="127.0.0.1", port=embedded.pg_port, user=admin, password=embedded.db_password,
                         dbname="postgres", connect_timeout=5)
    assert creds["db_admin_password"] not in "\n".join(stack.env_lines(sdir))


def test_information_schema_as_target_exits_2_before_anything_runs(run_pipeline):
    for schema in ("information_schema", "pg_catalog", "pg_toast", "pg_temp_1"):
        result = run_pipeline("--stages", "3", "-p", f"db_schema={schema}")
        assert result.returncode == 2, result.stderr
        assert "system schema" in result.stderr and "Traceback" not in result.stderr


# --- files only their owner can read -----------------------------------------------------------------

@pytest.fixture
def stranger():
    """A throwaway local account (tests run as root here and in CI), removed afterwards."""
    if os.geteuid() != 0:
        pytest.fail("this test creates a local account: run the suite as root (as CI does)")
    name = f"medstr{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "--no-create-home", "-s", "/bin/sh", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def as_user(user: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", *command], capture_output=True, text=True, timeout=30)


def test_another_account_reads_nothing_of_the_stack(session_dirs, embedded, s3, stranger, tmp_path):
    sdir = session_dirs["state"]
    s3.put_object(Bucket="raw", Key=f"probe/{uuid.uuid4().hex}.json", Body=SECRET_BODY)
    files = [p for p in sdir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".dat" for p in files) and any(p.name == "credentials.json" for p in files)
    assert any(p.name == "PG_VERSION" for p in files) and any(p.name == "weed.log" for p in files)
    # The account itself works: it can read a file that is meant for everyone.
    public = Path("/tmp") / f"medallion-public-{uuid.uuid4().hex}"
    public.write_text("hello")
    public.chmod(0o644)
    try:
        assert as_user(stranger, "cat", str(public)).stdout == "hello"
    finally:
        public.unlink()
    for path in files:
        result = as_user(stranger, "cat", str(path))
        assert result.returncode != 0 and "Permission denied" in result.stderr, f"{stranger} read {path}"
    listing = as_user(stranger, "ls", str(sdir))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr
    assert as_user(stranger, "grep", "-r", SECRET_BODY.decode(), str(sdir)).returncode != 0
    assert stat.S_IMODE(sdir.stat().st_mode) & 0o007 == 0


def test_the_postgres_system_user_reaches_its_data_and_nothing_else(session_dirs, embedded):
    if os.geteuid() != 0:
        pytest.fail("as root only: that is when PostgreSQL runs as the pgserver system user")
    sdir = session_dirs["state"]
    assert as_user(stack_state.PG_SYSTEM_USER, "cat", str(sdir / "postgres" / "data" / "PG_VERSION")).returncode == 0
    for path in (sdir / "credentials.json", sdir / "stack.json", sdir / "seaweedfs" / "weed.log"):
        assert as_user(stack_state.PG_SYSTEM_USER, "cat", str(path)).returncode != 0, path
    assert as_user(stack_state.PG_SYSTEM_USER, "ls", str(sdir)).returncode != 0


def test_a_cluster_from_before_the_administrator_is_migrated(tmp_path):
    sdir = tmp_path / ".state"
    state = stack_state.init_state(sdir, port_base=MIGRATION_PORT_BASE)
    # The layout the previous version wrote: no administrator, the pipeline role bootstraps the cluster.
    ports = json.loads((sdir / "stack.json").read_text())
    del ports["db_admin"]
    stack_state.write_private(sdir / "stack.json", ports)
    user = stack_state.pg_user()
    stack._prepare_pg_dirs(sdir, user)
    stack._initdb(sdir, user, state.db_user, state.db_password)
    try:
        stack._start_server(sdir, user, state.pg_port, 60)
        old = dict(host="127.0.0.1", port=state.pg_port, connect_timeout=5)
        conn = psycopg2.connect(**old, user=state.db_user, password=state.db_password, dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE countries")
        conn.close()
        conn = psycopg2.connect(**old, user=state.db_user, password=state.db_password, dbname="countries")
        conn.autocommit = True
        conn.cursor().execute("CREATE SCHEMA gold; CREATE TABLE gold.capitals (name text); "
                              "INSERT INTO gold.capitals VALUES ('Lima'); CREATE TABLE public.loads (n int)")
        conn.close()
        stack.stop_database(sdir)

        migrated = stack.up(sdir, ("database",))
        assert migrated.db_user == stack.MIGRATED_DB_USER and migrated.db_password == state.db_password
        assert json.loads((sdir / "stack.json").read_text())["db_admin"] == state.db_user
        conn = psycopg2.connect(**old, user=migrated.db_user, password=migrated.db_password, dbname="countries")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user")
                assert cur.fetchone() == (False, False, False)
                cur.execute("INSERT INTO gold.capitals VALUES ('Quito'); INSERT INTO public.loads VALUES (1)")
                cur.execute("SELECT name FROM gold.capitals ORDER BY name")
                assert cur.fetchall() == [("Lima",), ("Quito",)]
                cur.execute("SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class c JOIN pg_namespace n "
                            "ON n.oid = c.relnamespace WHERE nspname IN ('gold', 'public')")
                assert cur.fetchall() == [(migrated.db_user,)]
        finally:
            conn.close()
        # The old superuser login no longer opens with the password the pipeline (and `stack env`) used.
        with pytest.raises(psycopg2.OperationalError, match="password"):
            psycopg2.connect(**old, user=state.db_user, password=state.db_password, dbname="countries")
        assert stack.up(sdir, ("database",)) == migrated  # once only
    finally:
        stack.down(sdir)


def test_the_compose_init_script_creates_an_unprivileged_pipeline_role(session_dirs, embedded):
    """docker/postgres-init.sh, run as the postgres image runs it (as the administrator), here against
    the embedded server; then the role it made is examined."""
    sdir = session_dirs["state"]
    admin, admin_password = stack_state.admin_credentials(sdir)
    tag = uuid.uuid4().hex[:8]
    app = {"APP_DB_USER": f"app_{tag}", "APP_DB_PASSWORD": f"pw-{tag}'; DROP ROLE x; --", "APP_DB_NAME": f"db_{tag}"}
    secret = sdir.parent / f"db_password_{tag}"  # as Compose mounts it under /run/secrets/
    secret.write_text(app["APP_DB_PASSWORD"] + "\n")
    env = {"PATH": f"{Path(stack.pg_bin('psql')).parent}:{os.environ['PATH']}", "POSTGRES_USER": admin,
           "PGPASSWORD": admin_password, "PGHOST": "127.0.0.1", "PGPORT": str(embedded.pg_port),
           "APP_DB_USER": app["APP_DB_USER"], "APP_DB_NAME": app["APP_DB_NAME"], "APP_DB_PASSWORD_FILE": str(secret)}
    script = Path(__file__).resolve().parents[2] / "docker" / "postgres-init.sh"
    result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    conn = psycopg2.connect(host="127.0.0.1", port=embedded.pg_port, user=app["APP_DB_USER"],
                            password=app["APP_DB_PASSWORD"], dbname=app["APP_DB_NAME"], connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone() == (False, False, False)
            cur.execute("CREATE TABLE public.capitals (name text)")  # its own schema: allowed
            for statement in ("CREATE ROLE intruder", "CREATE DATABASE intruder",
                              "CREATE TABLE information_schema.intruder (x int)"):
                with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                    cur.execute(statement)
    finally:
        conn.close()
        admin_conn = stack._admin_connect(sdir, embedded)
        admin_conn.autocommit = True
        with admin_conn.cursor() as cur:
            cur.execute(f'DROP DATABASE "{app["APP_DB_NAME"]}"')
            cur.execute(f'DROP ROLE "{app["APP_DB_USER"]}"')
        admin_conn.close()
