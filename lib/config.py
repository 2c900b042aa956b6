"""Settings in one typed place, read from the environment, then `.env`, then the embedded stack.

Secrets are wrapped in ``Secret`` so that printing a settings object, a notebook cell or a log line can
never show them. Nothing here is a papermill parameter: notebooks call ``settings()`` themselves.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

from lib import contract, files, hints, names, params, redact, stack_state
from lib.errors import EXIT_USAGE, PipelineError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_API_URL = contract.api_url()
EMULATED_CLOUD_BUCKET = "cloud"
# Settings that are secrets: each also accepts <NAME>_FILE, a file holding the value (Docker and
# Kubernetes secrets, or a 0600 file written from a secrets manager by the scheduler).
SECRET_SETTINGS = ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "DB_PASSWORD", "AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "ALERT_URLS")


class ConfigError(PipelineError):
    """The configuration is missing or wrong; the message says which variable to set."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Secret:
    """A credential. Its repr and str are masked; call ``reveal()`` where a client needs it."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True)
class ObjectStore:
    url: str
    access_key: Secret
    secret_key: Secret
    region: str
    kind: str  # "embedded SeaweedFS" or "configured S3 endpoint"


@dataclass(frozen=True)
class Database:
    host: str
    port: int
    user: str
    password: Secret
    name: str
    kind: str  # "embedded PostgreSQL" or "configured PostgreSQL"
    connect_timeout: int = 10

    @property
    def masked_url(self) -> str:
        return f"postgresql://{self.user}:***@{self.host}:{self.port}/{self.name}"


@dataclass(frozen=True)
class Cloud:
    bucket: str
    prefix: str
    region: str
    profile: str | None
    endpoint_url: str | None
    emulated: bool
    # Explicit keys (AWS_ACCESS_KEY_ID/..., or the embedded store's when emulated there); when None,
    # boto3's own chain (AWS_PROFILE including SSO, instance roles) finds the credentials.
    access_key: Secret | None = None
    secret_key: Secret | None = None
    session_token: Secret | None = None

    @property
    def kind(self) -> str:
        return "emulated (S3-compatible endpoint)" if self.emulated else "AWS S3"


@dataclass(frozen=True)
class Settings:
    api_url: str = field(repr=False)  # may carry credentials: shown as `describe()` masks it
    snapshot_fallback: bool
    store: ObjectStore
    raw_bucket: str
    clean_bucket: str
    gold_bucket: str
    records_bucket: str  # every run's record (lib/record_store.py), on the same store
    db: Database
    cloud: Cloud
    outputs_dir: Path
    logs_dir: Path
    state_dir: Path
    # Why each service is the one it is, and why the snapshot fallback is on or off (`_why`): what a
    # run says as it starts, and the preflight when the fallback matters.
    why: dict = field(default_factory=dict, compare=False)

    def describe(self) -> dict:
        """What served a run, for the run record: endpoints and kinds, never credentials."""
        return {
            "api_url": redact.url(self.api_url),
            "snapshot_fallback": self.snapshot_fallback,
            "object_store": {
                "kind": self.store.kind,
                "endpoint": self.store.url,
                "buckets": {"raw": self.raw_bucket, "clean": self.clean_bucket, "gold": self.gold_bucket,
                            "records": self.records_bucket},
            },
            "database": {"kind": self.db.kind, "url": self.db.masked_url},
            "cloud": {
                "kind": self.cloud.kind,
                "bucket": self.cloud.bucket,
                "prefix": self.cloud.prefix,
                "endpoint": self.cloud.endpoint_url,
                "profile": self.cloud.profile,
            },
        }

    def secrets(self) -> list[str]:
        """Every secret value in force (each `Secret` among the settings, and the credentials the API URL
        carries), so logs and alerts can redact them."""
        def found(value):
            if isinstance(value, Secret):
                yield value
            elif dataclasses.is_dataclass(value):
                for f in dataclasses.fields(value):
                    yield from found(getattr(value, f.name))

        return [s.reveal() for s in found(self) if s] + redact.url_secrets(self.api_url)


def env_file() -> Path | None:
    """`.env` at the project root, or the file named by PIPELINE_ENV_FILE ('' for none)."""
    named = os.environ.get("PIPELINE_ENV_FILE")
    if named is not None:
        return Path(named) if named else None
    return ROOT / ".env"


def environment() -> dict[str, str]:
    """The process environment over `.env` (the environment wins, as with docker compose)."""
    merged: dict[str, str] = {}
    path = env_file()
    if path is not None and path.is_file():
        merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(os.environ)
    return merged


def resolve_secret_files(env: dict[str, str]) -> dict[str, str]:
    """A copy of `env` where each `<NAME>_FILE` of a secret setting is replaced by the file's content
    (one trailing newline dropped; a relative path is taken from the project folder). Raises
    ConfigError when both NAME and NAME_FILE are set, or the file is missing, unreadable or empty; the
    message names the variable and the path, never a value."""
    out = dict(env)
    for name in SECRET_SETTINGS:
        path = env.get(f"{name}_FILE")
        if not path:
            continue
        if env.get(name):
            raise ConfigError(f"both {name} and {name}_FILE are set: keep one of them")
        file = Path(path) if Path(path).is_absolute() else ROOT / path  # relative: to the project folder
        try:
            value = file.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
        except FileNotFoundError:
            raise ConfigError(f"{name}_FILE={path}: no such file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{name}_FILE={path}: cannot be read ({type(err).__name__}: "
                              f"{getattr(err, 'strerror', None) or 'not UTF-8 text'})") from None
        if not value.strip():
            raise ConfigError(f"{name}_FILE={path}: the file is empty")
        out[name] = value
    return out


def state_dir(env: dict[str, str] | None = None) -> Path:
    env = environment() if env is None else env
    return Path(env.get("PIPELINE_STATE_DIR") or ROOT / ".state").resolve()


def outputs_dir(env: dict[str, str] | None = None) -> Path:
    env = environment() if env is None else env
    return Path(env.get("PIPELINE_OUTPUTS_DIR") or ROOT / "outputs").resolve()


def logs_dir(env: dict[str, str] | None = None) -> Path:
    env = environment() if env is None else env
    return Path(env.get("PIPELINE_LOGS_DIR") or ROOT / "logs").resolve()


def _usable_dir(path: Path, variable: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{variable}: {path} is not a usable folder ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{variable}: {path} is not writable")


def check_folders(env: dict[str, str]) -> None:
    """Usable outputs and logs folders, checked before a run starts. Raises ConfigError."""
    _usable_dir(outputs_dir(env), "PIPELINE_OUTPUTS_DIR")
    _usable_dir(logs_dir(env), "PIPELINE_LOGS_DIR")


# Free space a run needs, checked before it starts and again before it publishes (docs/faults.md):
# folder variable → (bytes, times the expected payload). outputs/ holds the record and its pages
# (~2 MiB a run), logs/ a day's lines; the embedded stack's state folder holds the data, several times
# over: the raw payload, silver, the table with its history and staging copy, the export and gold.
SPACE_NEEDED = {"PIPELINE_OUTPUTS_DIR": (16 << 20, 0), "PIPELINE_LOGS_DIR": (1 << 20, 0),
                "PIPELINE_STATE_DIR": (64 << 20, 8)}


def space_problems(env: dict[str, str], payload_bytes: int) -> list[str]:
    """What lacks free space for a run whose raw payload is about `payload_bytes` (empty: enough).
    The state folder is checked only when the embedded stack keeps its data there."""
    folders = {"PIPELINE_OUTPUTS_DIR": outputs_dir(env), "PIPELINE_LOGS_DIR": logs_dir(env)}
    if uses_embedded_store(env) or uses_embedded_db(env):
        folders["PIPELINE_STATE_DIR"] = state_dir(env)
    problems = []
    for variable, folder in folders.items():
        fixed, times = SPACE_NEEDED[variable]
        needed, free = fixed + times * payload_bytes, files.free_bytes(folder)
        if free < needed:
            problems.append(f"not enough free space in {folder} ({variable}): {files.size(free)} free, a run "
                            f"needs at least {files.size(needed)} there")
    return problems


def provenance(name: str, env: dict[str, str]) -> str:
    """Where setting `name` comes from: the process environment, the `.env` file, or the settings
    a caller passed."""
    if name in os.environ:
        return "the environment"
    path = env_file()
    if path is not None and path.is_file() and name in dotenv_values(path):
        return str(path.name if path.parent == ROOT else path)
    return "the settings given"


def _why(env: dict[str, str], fallback: bool) -> dict[str, str]:
    """Why a run is on the services it is on, and why its snapshot fallback is on or off."""
    store = ("embedded: MINIO_URL is not set" if uses_embedded_store(env)
             else f"MINIO_URL from {provenance('MINIO_URL', env)}")
    database = ("embedded: DB_HOST is not set" if uses_embedded_db(env)
                else f"DB_HOST from {provenance('DB_HOST', env)}")
    raw = env.get("SNAPSHOT_FALLBACK", "").strip()
    if raw and raw.lower() != "auto":
        why = f"SNAPSHOT_FALLBACK={raw} from {provenance('SNAPSHOT_FALLBACK', env)}"
    elif fallback:
        why = "the default with the embedded object store"
    else:
        why = (f"the default with a configured object store (MINIO_URL from {provenance('MINIO_URL', env)}); "
               "SNAPSHOT_FALLBACK=true turns it on")
    return {"object_store": store, "database": database, "snapshot_fallback": why}


def uses_embedded_store(env: dict[str, str]) -> bool:
    return not env.get("MINIO_URL")


def uses_embedded_db(env: dict[str, str]) -> bool:
    return not env.get("DB_HOST")


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "auto"):
        return default
    try:
        return params.boolean(raw, name)
    except params.UsageError as err:
        raise ConfigError(str(err)) from None


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name) or str(default)
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def _required(env: dict[str, str], name: str) -> str:
    value = env.get(name)
    if not value:
        raise ConfigError(f"{name} is not set: add it to .env (see .env.example) or the environment")
    return value


def _embedded(sdir: Path):
    state = stack_state.read_state(sdir)
    if state is None:
        raise ConfigError(
            f"no object store or database is configured and the embedded stack in {sdir} is not "
            f"set up: run `{hints.command('stack', 'up')}` (or `make run`), or set MINIO_URL and "
            "DB_HOST in .env"
        )
    return state


def embedded_store(state: stack_state.EmbeddedState) -> ObjectStore:
    """The embedded SeaweedFS as the pipeline reaches it: its S3 URL and the pipeline's keys."""
    return ObjectStore(url=state.s3_url, access_key=Secret(state.access_key), secret_key=Secret(state.secret_key),
                       region="us-east-1", kind="embedded SeaweedFS")


def settings(env: dict[str, str] | None = None) -> Settings:
    """Build the settings. Raises ConfigError naming the variable that is missing or wrong."""
    env = resolve_secret_files(environment() if env is None else env)
    sdir = state_dir(env)
    state = _embedded(sdir) if (uses_embedded_store(env) or uses_embedded_db(env)) else None
    region = env.get("AWS_REGION") or "us-east-1"

    if uses_embedded_store(env):
        store = embedded_store(state)
    else:
        store = ObjectStore(
            url=env["MINIO_URL"],
            access_key=Secret(_required(env, "MINIO_ACCESS_KEY")),
            secret_key=Secret(_required(env, "MINIO_SECRET_KEY")),
            region=env.get("MINIO_REGION") or "us-east-1",
            kind="configured S3 endpoint",
        )

    if uses_embedded_db(env):
        db = Database(
            host="127.0.0.1",
            port=state.pg_port,
            user=state.db_user,
            password=Secret(state.db_password),
            name=state.db_name,
            kind="embedded PostgreSQL",
        )
    else:
        db = Database(
            host=env["DB_HOST"],
            port=_int(env, "DB_PORT", 5432),
            user=_required(env, "DB_USER"),
            password=Secret(env.get("DB_PASSWORD", "")),
            name=_required(env, "DB_NAME"),
            kind="configured PostgreSQL",
            connect_timeout=_int(env, "DB_CONNECT_TIMEOUT", 10),
        )

    prefix = names.prefix(env.get("S3_FOLDER_PREFIX", "exports").strip("/"))
    if env.get("S3_BUCKET_NAME"):
        endpoint = env.get("AWS_ENDPOINT_URL") or None
        keys = {}
        if env.get("AWS_ACCESS_KEY_ID"):  # from .env too, which boto3 would not read by itself
            keys = {"access_key": Secret(env["AWS_ACCESS_KEY_ID"]),
                    "secret_key": Secret(_required(env, "AWS_SECRET_ACCESS_KEY")),
                    "session_token": Secret(env.get("AWS_SESSION_TOKEN", ""))}
        cloud = Cloud(
            bucket=names.bucket(env["S3_BUCKET_NAME"]),
            prefix=prefix,
            region=region,
            profile=env.get("AWS_PROFILE") or None,
            endpoint_url=endpoint,
            emulated=endpoint is not None,
            **keys,
        )
    else:
        # No cloud bucket configured: a separate bucket on the local store plays the cloud's role.
        cloud = Cloud(
            bucket=EMULATED_CLOUD_BUCKET,
            prefix=prefix,
            region=store.region,
            profile=None,
            endpoint_url=store.url,
            emulated=True,
            access_key=store.access_key,
            secret_key=store.secret_key,
        )

    fallback = _flag(env, "SNAPSHOT_FALLBACK", default=uses_embedded_store(env))
    return Settings(
        api_url=env.get("API_BASE_URL") or DEFAULT_API_URL,
        snapshot_fallback=fallback,
        store=store,
        raw_bucket=names.bucket(env.get("BUCKET_NAME") or "raw"),
        clean_bucket=names.bucket(env.get("CLEAN_BUCKET") or "clean"),
        gold_bucket=names.bucket(env.get("GOLD_BUCKET") or "gold"),
        records_bucket=names.bucket(env.get("RECORDS_BUCKET") or "records"),
        db=db,
        cloud=cloud,
        outputs_dir=outputs_dir(env),
        logs_dir=Path(env.get("PIPELINE_LOGS_DIR") or ROOT / "logs").resolve(),
        state_dir=sdir,
        why=_why(env, fallback),
    )
