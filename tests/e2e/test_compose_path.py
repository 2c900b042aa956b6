"""The configured-services path, set up as docker-compose.yml sets it up, without a Docker engine.

- The project folder is a scratch folder where docs/stack.md's Compose commands (the secrets, `cp
  .env.example .env`) ran as shown; `.env` then gets this machine's ports and absolute secret paths.
- PostgreSQL 15 from the OS packages (`make test` installs postgresql-15) is initialised the way the
  postgres image's entrypoint does it: the `postgres` service's environment from the Compose file
  (interpolated from `.env`), its Docker secrets at a stand-in for /run/secrets (hard links: a bind mount
  shows the same file, owner and mode), initdb as the database's OS user, a socket-only temporary server,
  every /docker-entrypoint-initdb.d script the Compose file mounts (docker/postgres-init.sh) run as
  that user, then the server on a free loopback port.
- MinIO's part is played by a SeaweedFS S3 server of its own (lib/stack.py's, in its own folder, on its
  own ports) whose keys are the `minio_*` secrets, and the `minio-init` service's buckets are made in it.
- `run_pipeline.py` runs twice with that `.env` (PIPELINE_ENV_FILE), the second day on changed API data.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2
import pytest
from dotenv import dotenv_values

from lib import config, db_read, stack, stack_state, storage
from tests import compose
from tests.conftest import COMPOSE_S3_PORT_BASE, ROOT

PG_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15
RUN_SECRETS = "/run/secrets/"
INITDB_D = "/docker-entrypoint-initdb.d/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def documented_commands() -> list[str]:
    """The commands of docs/stack.md's Compose section that set a project up, up to `docker compose`."""
    text = (ROOT / "docs" / "stack.md").read_text(encoding="utf-8")
    section = text.split("## With Docker Compose instead", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return block.split("docker compose", 1)[0].rstrip().splitlines()


class PostgresImage:
    """What the postgres image's entrypoint does for an empty data folder, with the OS's PostgreSQL 15."""

    def __init__(self, folder: Path, environment: dict[str, str]):
        self.folder, self.data, self.sockets = folder, folder / "data", folder / "sockets"
        self.log = folder / "postgres.log"
        self.user = "postgres" if os.geteuid() == 0 else None  # PostgreSQL refuses to run as root
        self.port = free_port()
        # docker_setup_env (as root, before the entrypoint drops to the postgres user): file_env.
        env = dict(environment)
        if env.get("POSTGRES_PASSWORD_FILE"):
            env["POSTGRES_PASSWORD"] = Path(env.pop("POSTGRES_PASSWORD_FILE")).read_text()
        env.setdefault("POSTGRES_USER", "postgres")
        env.setdefault("POSTGRES_DB", env["POSTGRES_USER"])
        self.env = env

    def _as_user(self, args: list[str], env: dict | None = None, sql: str | None = None) -> subprocess.CompletedProcess:
        """`args` run as the database's OS user (the entrypoint's gosu), `sql` on its standard input."""
        ids = {"user": self.user, "group": self.user, "extra_groups": []} if self.user else {}
        base = {"PATH": f"{PG_BIN}:/usr/bin:/bin", "HOME": str(self.folder), "LC_ALL": "C"}
        feed = {"input": sql} if sql is not None else {"stdin": subprocess.DEVNULL}
        return subprocess.run(args, env={**base, **(env or {})}, capture_output=True, text=True,
                              timeout=120, **ids, **feed)

    def _check(self, res: subprocess.CompletedProcess, what: str) -> None:
        log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        assert res.returncode == 0, f"{what} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}\n{log}"

    def _own(self, *paths: Path) -> None:
        if self.user:
            entry = pwd.getpwnam(self.user)
            for path in paths:
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _start(self, listen: str) -> None:
        opts = f"-c listen_addresses='{listen}' -p {self.port} -k {self.sockets}"
        self._check(self._as_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                                   "-o", opts, "-w", "start"]), "pg_ctl start")

    def _stop(self) -> None:
        self._check(self._as_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                    "pg_ctl stop")

    def initialise(self, init_scripts: list[Path]) -> None:
        for folder in (self.folder, self.data, self.sockets):
            folder.mkdir(mode=0o700, exist_ok=True)
        self.log.touch(mode=0o600)
        self._own(self.folder, self.data, self.sockets, self.log)
        # docker_init_database_dir: initdb --username=$POSTGRES_USER --pwfile=<(password). The image's
        # cluster trusts its own socket and loopback, and pg_setup_hba_conf adds password (scram) auth for
        # every other host, which is where a published port's connections come from. Here they arrive
        # over loopback, so loopback asks for the password as they are asked.
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self.env["POSTGRES_PASSWORD"] + "\n")
        pwfile.chmod(0o600)
        self._own(pwfile)
        try:
            self._check(self._as_user([str(PG_BIN / "initdb"), "-D", str(self.data),
                                       f"--username={self.env['POSTGRES_USER']}", f"--pwfile={pwfile}",
                                       "--auth-local=trust", "--auth-host=scram-sha-256",
                                       "--encoding=UTF8", "--locale=C"]), "initdb")
        finally:
            pwfile.unlink()
        # docker_temp_server_start: a socket-only server; PGPASSWORD exported.
        self._start(listen="")
        env = {**self.env, "PGDATA": str(self.data), "PGPASSWORD": self.env["POSTGRES_PASSWORD"],
               "PGHOST": str(self.sockets), "PGPORT": str(self.port)}
        psql = [str(PG_BIN / "psql"), "-v", "ON_ERROR_STOP=1", "--username", self.env["POSTGRES_USER"],
                "--no-password", "--no-psqlrc"]
        # docker_setup_db: POSTGRES_DB, unless it exists.
        db = ["--dbname", "postgres", "--set", f"db={self.env['POSTGRES_DB']}"]
        found = self._as_user([*psql, *db, "--tuples-only"], env, "SELECT 1 FROM pg_database WHERE datname = :'db';")
        self._check(found, "docker_setup_db")
        if not found.stdout.strip():
            self._check(self._as_user([*psql, *db], env, 'CREATE DATABASE :"db";'), "docker_setup_db")
        # docker_process_init_files: each *.sh is run when executable, sourced otherwise.
        for script in init_scripts:
            args = [str(script)] if os.access(script, os.X_OK) else ["bash", "-c", '. "$1"', "bash", str(script)]
            self._check(self._as_user(args, env), f"{script.name} (as /docker-entrypoint-initdb.d/ runs it)")
        self._stop()
        self._start(listen="127.0.0.1")  # exec postgres: the published port

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._stop()


def fill(env_file: Path, values: dict[str, str]) -> None:
    """Set each `NAME=` line of `env_file` (a copy of .env.example) to `values[NAME]`."""
    text = env_file.read_text(encoding="utf-8")
    for name, value in values.items():
        text, found = re.subn(rf"^{name}=.*$", lambda _: f"{name}={value}", text, flags=re.M)
        assert found == 1, f".env.example has no line {name}="
    env_file.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def deployment(api):
    """A project folder set up as docs/stack.md says, its `.env` filled in, and the Compose services'
    stand-ins running: PostgreSQL 15 initialised as the image does, an S3 server with the buckets."""
    if not (PG_BIN / "postgres").exists():
        raise RuntimeError(f"no PostgreSQL 15 in {PG_BIN}: `make test` installs it (apt-get install postgresql-15)")
    base = Path(tempfile.mkdtemp(prefix="medallion-compose-"))
    base.chmod(0o711)  # the database's OS user passes through to its own folder
    s3dir, postgres = base / "s3", None
    try:
        project = base / "project"
        project.mkdir()
        shutil.copy(ROOT / ".env.example", project / ".env.example")
        res = subprocess.run(["bash", "-euc", "\n".join(documented_commands())], cwd=project, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr

        # The Compose file as `docker compose` reads it from this project: .env's values interpolated.
        env_file = project / ".env"
        spec = compose.load({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        run_secrets = base / "run-secrets"
        run_secrets.mkdir(mode=0o755)
        run_secrets.chmod(0o755)

        def mounted(service: str) -> dict[str, str]:
            """The service's environment, its secrets "mounted" where /run/secrets/<name> stands."""
            for name in spec["services"][service].get("secrets", []):
                target = run_secrets / name
                if not target.exists():
                    os.link(project / spec["secrets"][name]["file"], target)
            return {k: str(v).replace(RUN_SECRETS, f"{run_secrets}/")
                    for k, v in (spec["services"][service].get("environment") or {}).items()}

        postgres = PostgresImage(base / "postgres", mounted("postgres"))
        # The scripts mounted into /docker-entrypoint-initdb.d/ (this checkout's files, owner and mode),
        # in the order the entrypoint's glob lists them.
        initdb_d = base / "docker-entrypoint-initdb.d"
        initdb_d.mkdir(mode=0o755)
        initdb_d.chmod(0o755)
        for source, target, *_ in (v.split(":") for v in spec["services"]["postgres"]["volumes"]):
            if target.startswith(INITDB_D):
                shutil.copy2(ROOT / source, initdb_d / target.removeprefix(INITDB_D))
        postgres.initialise(sorted(initdb_d.iterdir()))

        # MinIO: its root user and password are the files named by MINIO_ROOT_*_FILE in /run/secrets.
        minio = mounted("minio")
        s3dir.mkdir()
        stack_state.write_private(s3dir / "credentials.json", {
            "access_key": (run_secrets / minio["MINIO_ROOT_USER_FILE"]).read_text().strip(),
            "secret_key": (run_secrets / minio["MINIO_ROOT_PASSWORD_FILE"]).read_text().strip(),
            "db_password": ""})
        state = stack_state.init_state(s3dir, port_base=COMPOSE_S3_PORT_BASE)
        stack.start_object_store(s3dir, state)

        # minio-init: `mc mb --ignore-existing local/$bucket` for each of $BUCKETS.
        store = config.ObjectStore(url=state.s3_url, access_key=config.Secret(state.access_key),
                                   secret_key=config.Secret(state.secret_key), region="us-east-1", kind="MinIO")
        s3 = storage.client(store)
        for bucket in spec["services"]["minio-init"]["environment"]["BUCKETS"].split():
            storage.ensure_bucket(s3, bucket)

        fill(env_file, {
            "API_BASE_URL": api.url,
            "MINIO_URL": f"http://localhost:{state.s3_port}",
            "AWS_ENDPOINT_URL": f"http://localhost:{state.s3_port}",
            "DB_PORT": str(postgres.port),
            # relative secret paths are taken from the project folder: this one's is a scratch folder
            **{k: str(project / v) for k, v in dotenv_values(env_file).items() if k.endswith("_FILE") and v},
        })
        yield {"base": base, "project": project, "env_file": env_file, "postgres": postgres, "s3": s3,
               "settings": dotenv_values(env_file)}
    finally:
        stack.stop_object_store(s3dir)
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(base, ignore_errors=True)


def run_pipeline(deployment, *args: str) -> subprocess.CompletedProcess:
    """`run_pipeline.py ARGS` with the deployment's `.env`: no variable of .env.example comes from the
    suite's environment (the environment would win over .env), and no embedded stack can be used."""
    example = dotenv_values(ROOT / ".env.example")
    env = {k: v for k, v in os.environ.items() if k not in example}
    base = deployment["base"]
    env.update(PIPELINE_ENV_FILE=str(deployment["env_file"]), PIPELINE_STATE_DIR=str(base / "state"),
               PIPELINE_OUTPUTS_DIR=str(base / "outputs"), PIPELINE_LOGS_DIR=str(base / "logs"))
    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def manifest(deployment, run_id: str) -> dict:
    return json.loads((deployment["base"] / "outputs" / "runs" / run_id / "manifest.json").read_text())


def connect(deployment):
    """The pipeline's role, as .env configures it."""
    env = deployment["settings"]
    return psycopg2.connect(host=env["DB_HOST"], port=int(env["DB_PORT"]), user=env["DB_USER"],
                            password=Path(env["DB_PASSWORD_FILE"]).read_text().strip(), dbname=env["DB_NAME"],
                            connect_timeout=10)


def test_two_days_on_the_compose_services(deployment, api):
    env = deployment["settings"]
    buckets = {env["BUCKET_NAME"], env["CLEAN_BUCKET"], env["GOLD_BUCKET"], env["S3_BUCKET_NAME"]}
    day1, day2 = f"compose-{secrets.token_hex(4)}-1", f"compose-{secrets.token_hex(4)}-2"

    res = run_pipeline(deployment, "--run-id", day1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"run {day1} SUCCEEDED" in res.stdout
    m = manifest(deployment, day1)
    assert m["status"] == "succeeded"
    assert m["stack"]["object_store"] == {"kind": "configured S3 endpoint", "endpoint": env["MINIO_URL"],
                                          "buckets": {"raw": "raw", "clean": "clean", "gold": "gold",
                                                      "records": env["RECORDS_BUCKET"]}}
    assert m["stack"]["database"] == {"kind": "configured PostgreSQL",
                                      "url": f"postgresql://medallion:***@localhost:{env['DB_PORT']}/countries"}
    assert m["stack"]["cloud"]["bucket"] == "cloud" and m["stack"]["cloud"]["endpoint"] == env["AWS_ENDPOINT_URL"]
    assert m["stages"]["01_ingest"]["details"]["origin"] == "api"
    # Every object the run recorded is in the configured S3 server's buckets, as recorded.
    objects = [o for stage in m["stages"].values() for o in stage["objects"] if "bucket" in o]
    assert {o["bucket"] for o in objects} == buckets
    for o in objects:
        assert storage.head(deployment["s3"], o["bucket"], o["key"])["size"] == o["size"], o
    # The run's record is kept in the records bucket minio-init made, every stage's execution in it.
    kept = [o["key"] for o in storage.list_objects(deployment["s3"], env["RECORDS_BUCKET"], f"runs/{day1}/")]
    assert {f"runs/{day1}/stages/{s}.attempt1.json" for s in m["stages"]} <= set(kept), kept
    # The table is in the configured PostgreSQL 15, owned by the pipeline's unprivileged role.
    conn = connect(deployment)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            assert cur.fetchone()[0].startswith("15.")
            cur.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user")
            assert cur.fetchone() == (False, False, False)
            cur.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = 'capitals_clean'")
            assert cur.fetchone() == ("medallion",)
        assert len(db_read.current(conn, "public", "capitals_clean")) == 250
    finally:
        conn.close()
    # Nothing embedded was started or set up.
    assert not (deployment["base"] / "state").exists() or not any((deployment["base"] / "state").iterdir())

    # Day 2: the API answers one country's population changed.
    france = next(r for r in api.records if r["name"]["common"] == "France")
    old = france["population"]
    france["population"] = old + 1000
    res = run_pipeline(deployment, "--run-id", day2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m2 = manifest(deployment, day2)
    assert m2["status"] == "succeeded"
    assert m2["stages"]["05_gold"]["details"]["previous_run_id"] == day1
    assert m2["stages"]["05_gold"]["details"]["changes"] == {"added": 0, "removed": 0, "changed": 1, "held": 0}
    diff = run_pipeline(deployment, "diff", day1, day2)
    assert diff.returncode == 0, diff.stderr
    assert "0 added, 0 removed, 1 changed" in diff.stdout
    assert f"population: {old} → {old + 1000}" in diff.stdout
