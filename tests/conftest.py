"""Shared fixtures: real services for every test.

- an embedded stack (SeaweedFS S3 + PostgreSQL) in a temporary state folder, on its own ports, started
  once per session and stopped at the end;
- a local HTTP server answering like the REST Countries API (tests/api_server.py);
- the environment pointing the pipeline at both, ignoring any developer `.env`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from lib import config, stack

ROOT = Path(__file__).resolve().parents[1]
# Ports. `make test` runs the suite on pytest-xdist workers (gw0, gw1, ...; a run without xdist is gw0),
# each with its own stack: worker N has the WORKER_PORTS ports from TEST_STACK_PORT_BASE + N x WORKER_PORTS
# (and the SeaweedFS gRPC ports 10000 above them). Every stack a test starts takes six of them (lib/stack_state.py's
# PORT_OFFSETS) from one of the bases below, all inside the worker's own ports.
SUITE_PORT_BASE = int(os.environ.get("TEST_STACK_PORT_BASE", "18530"))
WORKER_PORTS = 100
WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
TEST_PORT_BASE = SUITE_PORT_BASE + WORKER_PORTS * WORKER  # the session's stack (the `embedded` fixture)
DOCS_PORT_BASE = TEST_PORT_BASE + 10  # the documents' own stacks, one at a time (tests/e2e/test_documented_commands.py)
SECRETS_PORT_BASE = TEST_PORT_BASE + 20  # the stack with sentinel credentials (tests/e2e/test_secrets.py)
COMPOSE_S3_PORT_BASE = TEST_PORT_BASE + 30  # the Compose path's S3 stand-in (tests/e2e/test_compose_path.py)
ORPHAN_BASE = TEST_PORT_BASE + 40  # orphaned and stubborn stacks (tests/test_stack*.py): +40, +60, +70 and +90
BENCH_PORT_BASE = TEST_PORT_BASE + 50  # the benchmark's private stack (tests/test_bench.py)
MIGRATION_PORT_BASE = TEST_PORT_BASE + 80  # a cluster of the previous layout (tests/e2e/test_security.py)
# A suite a test runs (the documents' `python -m pytest` commands) gets the ports after every worker's.
NESTED_SUITE_PORT_BASE = SUITE_PORT_BASE + WORKER_PORTS * (WORKERS + WORKER)
# Variables that would point the pipeline at other services: cleared for the test session.
SERVICE_VARS = ("MINIO_URL", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "DB_HOST", "DB_PORT", "DB_USER",
                "DB_PASSWORD", "DB_NAME", "S3_BUCKET_NAME", "AWS_ENDPOINT_URL", "AWS_PROFILE",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "BUCKET_NAME",
                "CLEAN_BUCKET", "GOLD_BUCKET", "RECORDS_BUCKET", "S3_FOLDER_PREFIX", "SNAPSHOT_FALLBACK")


@pytest.fixture(scope="session")
def api():
    from tests.api_server import RestCountriesServer

    server = RestCountriesServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def session_dirs():
    # Not under pytest's own temp folder: pytest resets that to mode 0700 whenever another session
    # starts, and the PostgreSQL system user must be able to reach its data folder.
    base = Path(tempfile.mkdtemp(prefix="medallion-tests-"))
    yield {"state": base / "state", "outputs": base / "outputs", "logs": base / "logs"}
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def pipeline_env(session_dirs, api):
    """The environment every test (and every runner or kernel they start) sees."""
    saved = dict(os.environ)
    for name in SERVICE_VARS:
        os.environ.pop(name, None)
    os.environ.update({
        "PIPELINE_ENV_FILE": "",
        "PIPELINE_STATE_DIR": str(session_dirs["state"]),
        "PIPELINE_OUTPUTS_DIR": str(session_dirs["outputs"]),
        "PIPELINE_LOGS_DIR": str(session_dirs["logs"]),
        "PIPELINE_STACK_PORT_BASE": str(TEST_PORT_BASE),
        "API_BASE_URL": api.url,
        "SNAPSHOT_FALLBACK": "false",
    })
    yield dict(os.environ)
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def embedded(pipeline_env, session_dirs):
    """The embedded stack, up for the whole session (stopped even if starting it failed half-way)."""
    try:
        yield stack.up(session_dirs["state"])
    finally:
        stack.down(session_dirs["state"])


@pytest.fixture
def stack_tmp():
    """A temporary folder for a test's own stack folders: pytest's tmp_path is too deep under pytest-xdist
    for the Unix sockets SeaweedFS makes in its state folder (at most 107 bytes of path)."""
    base = Path(tempfile.mkdtemp(prefix="medallion-stack-"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sdir(session_dirs, embedded) -> Path:
    """The session's state folder, its stack up."""
    return session_dirs["state"]


@pytest.fixture
def settings(embedded):
    return config.settings()


@pytest.fixture(autouse=True)
def fresh_api(api):
    api.reset()
    yield api


@pytest.fixture
def s3(settings):
    from lib import storage

    return storage.client(settings.store)


@pytest.fixture
def pg(settings):
    from lib import db

    conn = db.connect(settings.db, application_name="countries-medallion tests")
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def unique():
    """A short unique suffix for run ids, tables and prefixes, so tests never share state."""
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def clean():
    """The bundled snapshot's valid rows, as stage 2 leaves them."""
    from lib import quality, source, transform

    records = source.parse_payload(source.snapshot_bytes())
    return quality.validate(transform.flatten(records), records).clean


@pytest.fixture
def table(unique):
    return f"t_{unique}"


@pytest.fixture
def lingering(settings, clean, table, unique):
    """A session left by a kernel killed mid-load: named like a stage's, idle in a transaction that
    holds an exclusive lock on the table."""
    from psycopg2 import sql

    from lib import db, db_load
    from tests.db_helpers import SCHEMA, csv

    run_id = f"dead-{unique}"
    setup = db.connect(settings.db)
    setup.autocommit = True
    db_load.merge(setup, csv(clean.head(3)), db_load.MergeOptions(schema=SCHEMA, table=table, run_id="r1"))
    setup.close()
    conn = db.connect(settings.db, application_name=f"countries-medallion 03_load {run_id}")
    with conn.cursor() as cur:
        cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(db.ident(SCHEMA, table)))
    yield run_id, conn
    conn.close()


@pytest.fixture
def run_pipeline(embedded):
    """Run `python run_pipeline.py ARGS` as a user would; returns the CompletedProcess."""

    def run(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=ROOT,
                              env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    return run


@pytest.fixture
def project_clone(tmp_path) -> Path:
    """A clone of the project's HEAD in the test's folder, set up as `make lab` sets up a clone (`make
    git-filters`), the real .venv reachable at .venv/bin where the filters name it."""
    clone = tmp_path / "project"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, capture_output=True)
    # Files as old as git's index are "racily clean": git would read each through the clean filter (a
    # Python process per notebook) at the next status. Dated a minute back and refreshed before the
    # filters are set, they are not.
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=clone, check=True, capture_output=True,
                             text=True).stdout.split("\0")
    before = time.time() - 60
    for name in filter(None, tracked):
        os.utime(clone / name, (before, before), follow_symlinks=False)
    subprocess.run(["git", "update-index", "-q", "--refresh"], cwd=clone, check=True, capture_output=True)
    (clone / ".venv").mkdir()
    (clone / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    # .venv/.installed is the real venv's business: not remade here (-o).
    made = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "git-filters"], cwd=clone,
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True)
    assert status.stdout == "", status.stdout
    return clone
