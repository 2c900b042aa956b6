"""lib.config: which services a configuration selects, the cloud role, and secrets never shown."""

from __future__ import annotations

import json

import pytest

from lib import config, stack_state
from lib.config import ConfigError, Secret
from lib.names import InvalidName

CONFIGURED = {
    "MINIO_URL": "http://minio.example:9000",
    "MINIO_ACCESS_KEY": "configured-access",
    "MINIO_SECRET_KEY": "configured-secret-value",
    "DB_HOST": "db.example",
    "DB_PORT": "6543",
    "DB_USER": "etl",
    "DB_PASSWORD": "configured-db-password",
    "DB_NAME": "countries",
}


@pytest.fixture
def env(tmp_path):
    """A fully configured environment (no embedded stack) with its own empty state folder."""
    return {**CONFIGURED, "PIPELINE_STATE_DIR": str(tmp_path / "state"),
            "PIPELINE_OUTPUTS_DIR": str(tmp_path / "outputs")}


@pytest.fixture
def embedded_env(tmp_path):
    """No services configured; a state folder initialised (files only, nothing started)."""
    sdir = tmp_path / "state"
    state = stack_state.init_state(sdir, port_base=19100)
    return {"PIPELINE_STATE_DIR": str(sdir)}, state


def test_configured_services_need_no_embedded_stack(env):
    s = config.settings(env)
    assert s.store.kind == "configured S3 endpoint" and s.store.url == "http://minio.example:9000"
    assert s.db.kind == "configured PostgreSQL"
    assert (s.db.host, s.db.port, s.db.user, s.db.name) == ("db.example", 6543, "etl", "countries")
    assert s.snapshot_fallback is False  # a configured store means a real deployment: no silent fallback


def test_embedded_services_come_from_the_state_folder(embedded_env):
    env, state = embedded_env
    s = config.settings(env)
    assert s.store.kind == "embedded SeaweedFS" and s.store.url == "http://127.0.0.1:19100"
    assert s.store.access_key.reveal() == state.access_key
    assert s.db.kind == "embedded PostgreSQL"
    assert (s.db.host, s.db.port, s.db.user) == ("127.0.0.1", 19105, state.db_user)
    assert s.db.password.reveal() == state.db_password
    assert s.snapshot_fallback is True


def test_minio_url_alone_selects_a_configured_store_and_the_embedded_database(embedded_env):
    env, _ = embedded_env
    s = config.settings({**env, "MINIO_URL": "http://minio:9000", "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "b"})
    assert s.store.kind == "configured S3 endpoint"
    assert s.db.kind == "embedded PostgreSQL"


def test_db_host_alone_selects_a_configured_database_and_the_embedded_store(embedded_env):
    env, _ = embedded_env
    s = config.settings({**env, "DB_HOST": "db", "DB_USER": "u", "DB_NAME": "n"})
    assert s.store.kind == "embedded SeaweedFS"
    assert s.db.kind == "configured PostgreSQL" and s.db.port == 5432


def test_embedded_selection_without_a_state_folder_says_how_to_set_it_up(tmp_path):
    with pytest.raises(ConfigError, match="stack up"):
        config.settings({"PIPELINE_STATE_DIR": str(tmp_path / "none")})


@pytest.mark.parametrize("missing", ["MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "DB_USER", "DB_NAME"])
def test_a_missing_required_variable_is_named(env, missing):
    del env[missing]
    with pytest.raises(ConfigError, match=missing):
        config.settings(env)


@pytest.mark.parametrize("name, value", [("DB_PORT", "five"), ("SNAPSHOT_FALLBACK", "maybe"),
                                         ("DB_CONNECT_TIMEOUT", "10s")])
def test_a_malformed_value_is_named(env, name, value):
    with pytest.raises(ConfigError, match=name):
        config.settings({**env, name: value})


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("off", False), ("auto", False)])
def test_snapshot_fallback_flag(env, value, expected):
    assert config.settings({**env, "SNAPSHOT_FALLBACK": value}).snapshot_fallback is expected


def test_cloud_is_emulated_on_the_local_store_when_no_bucket_is_configured(env):
    s = config.settings(env)
    assert s.cloud.emulated and s.cloud.kind.startswith("emulated")
    assert s.cloud.bucket == config.EMULATED_CLOUD_BUCKET
    assert s.cloud.endpoint_url == s.store.url
    assert s.cloud.access_key.reveal() == "configured-access"
    assert s.cloud.secret_key.reveal() == "configured-secret-value"
    assert s.cloud.prefix == "exports"


def test_a_configured_bucket_without_endpoint_is_real_aws_s3_with_boto3_credentials(env):
    s = config.settings({**env, "S3_BUCKET_NAME": "my-exports", "AWS_PROFILE": "sso-dev", "AWS_REGION": "eu-west-1",
                     "S3_FOLDER_PREFIX": "/team/countries/"})
    assert not s.cloud.emulated and s.cloud.kind == "AWS S3"
    assert (s.cloud.bucket, s.cloud.region, s.cloud.profile) == ("my-exports", "eu-west-1", "sso-dev")
    assert s.cloud.endpoint_url is None
    assert s.cloud.access_key is None and s.cloud.secret_key is None
    assert s.cloud.prefix == "team/countries"


def test_aws_endpoint_url_makes_the_configured_bucket_emulated(env):
    s = config.settings({**env, "S3_BUCKET_NAME": "my-exports", "AWS_ENDPOINT_URL": "http://localstack:4566"})
    assert s.cloud.emulated and s.cloud.endpoint_url == "http://localstack:4566"
    assert s.cloud.kind.startswith("emulated")


@pytest.mark.parametrize("name, value", [("S3_BUCKET_NAME", "My_Bucket"), ("BUCKET_NAME", "ab"),
                                         ("CLEAN_BUCKET", "a..b"), ("GOLD_BUCKET", "-gold")])
def test_bad_bucket_names_from_the_environment_are_refused(env, name, value):
    with pytest.raises(InvalidName, match="bucket name"):
        config.settings({**env, name: value})


def test_bad_folder_prefix_is_refused(env):
    with pytest.raises(InvalidName, match="key prefix"):
        config.settings({**env, "S3_FOLDER_PREFIX": "a/../b"})


def test_secret_repr_and_str_are_masked():
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret) and "hunter2" not in f"{secret}"
    assert repr(secret) == "Secret('***')"
    assert secret.reveal() == "hunter2" and bool(secret)
    assert not Secret("") and repr(Secret("")) == "Secret('')"


def test_settings_repr_and_describe_show_no_secret_values(env):
    s = config.settings(env)
    secrets = s.secrets()
    assert set(secrets) == {"configured-access", "configured-secret-value", "configured-db-password"}
    described = json.dumps(s.describe())
    shown = repr(s) + described + s.db.masked_url
    for value in secrets:
        assert value not in shown
    assert s.describe()["database"]["url"] == "postgresql://etl:***@db.example:6543/countries"


def test_the_api_urls_credentials_are_secrets_masked_in_describe_and_repr(env):
    url = "https://reader:pw%2Fsecret@api.example/v3.1/all?fields=name&apikey=key-value"
    s = config.settings({**env, "API_BASE_URL": url})
    assert s.api_url == url  # the request uses them
    assert {"pw%2Fsecret", "pw/secret", "key-value"} <= set(s.secrets())
    assert s.describe()["api_url"] == "https://***@api.example/v3.1/all?fields=name&apikey=***"
    shown = repr(s) + json.dumps(s.describe())
    assert [v for v in s.secrets() if v in shown] == []


def test_embedded_describe_has_no_generated_secrets(embedded_env):
    env, state = embedded_env
    s = config.settings(env)
    text = json.dumps(s.describe()) + repr(s)
    for value in (state.access_key, state.secret_key, state.db_password):
        assert value not in text


def test_env_file_is_read_and_the_process_environment_wins(tmp_path, monkeypatch):
    dotenv = tmp_path / "custom.env"
    dotenv.write_text("DB_HOST=from-file\nGOLD_BUCKET=gold-from-file\n")
    monkeypatch.setenv("PIPELINE_ENV_FILE", str(dotenv))
    monkeypatch.setenv("DB_HOST", "from-environment")
    merged = config.environment()
    assert merged["DB_HOST"] == "from-environment"
    assert merged["GOLD_BUCKET"] == "gold-from-file"


def test_empty_env_file_setting_reads_no_file(monkeypatch):
    monkeypatch.setenv("PIPELINE_ENV_FILE", "")
    assert config.env_file() is None


# --- secrets from files (<NAME>_FILE) ------------------------------------------------------------------

def _secret_file(tmp_path, name: str, content: str, mode: int = 0o600):
    path = tmp_path / name
    path.write_text(content)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("name", config.SECRET_SETTINGS)
def test_every_secret_setting_accepts_a_file(tmp_path, name):
    path = _secret_file(tmp_path, name.lower(), f"value-of-{name}\n")  # Docker secrets end with a newline
    assert config.resolve_secret_files({f"{name}_FILE": path})[name] == f"value-of-{name}"


def test_secret_files_reach_the_settings(env, tmp_path):
    for name in ("MINIO_SECRET_KEY", "DB_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name, None)
    env.update(MINIO_SECRET_KEY_FILE=_secret_file(tmp_path, "minio", "minio-from-file\n"),
               DB_PASSWORD_FILE=_secret_file(tmp_path, "db", "db pass from file\r\n"),
               S3_BUCKET_NAME="my-exports", AWS_ACCESS_KEY_ID="AKIAEXAMPLE",
               AWS_SECRET_ACCESS_KEY_FILE=_secret_file(tmp_path, "aws", "aws-secret-from-file"))
    s = config.settings(env)
    assert s.store.secret_key.reveal() == "minio-from-file"
    assert s.db.password.reveal() == "db pass from file"  # inner spaces kept, only the newline dropped
    assert s.cloud.secret_key.reveal() == "aws-secret-from-file"
    assert {"minio-from-file", "db pass from file", "aws-secret-from-file"} <= set(s.secrets())
    assert "from-file" not in repr(s) + json.dumps(s.describe())


def test_a_secret_set_both_ways_is_refused(env, tmp_path):
    env["DB_PASSWORD_FILE"] = _secret_file(tmp_path, "db", "other")
    with pytest.raises(ConfigError, match="both DB_PASSWORD and DB_PASSWORD_FILE are set") as err:
        config.settings(env)
    assert "configured-db-password" not in str(err.value) and "other" not in str(err.value)


def test_a_missing_secret_file_is_named(env, tmp_path):
    del env["MINIO_SECRET_KEY"]
    env["MINIO_SECRET_KEY_FILE"] = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"MINIO_SECRET_KEY_FILE=.*nope: no such file"):
        config.settings(env)


@pytest.mark.parametrize("content", ["", "\n", "   \n"])
def test_an_empty_secret_file_is_refused(env, tmp_path, content):
    del env["DB_PASSWORD"]
    env["DB_PASSWORD_FILE"] = _secret_file(tmp_path, "db", content)
    with pytest.raises(ConfigError, match="DB_PASSWORD_FILE=.*the file is empty"):
        config.settings(env)


def test_an_unreadable_secret_file_is_refused(env, tmp_path):
    del env["DB_PASSWORD"]
    env["DB_PASSWORD_FILE"] = str(tmp_path)  # a folder: reading it fails as it would for any unreadable file
    with pytest.raises(ConfigError, match="DB_PASSWORD_FILE=.*cannot be read"):
        config.settings(env)


def test_a_secret_file_that_is_not_text_is_refused(env, tmp_path):
    del env["DB_PASSWORD"]
    path = tmp_path / "binary"
    path.write_bytes(b"\xff\xfe\x00")
    env["DB_PASSWORD_FILE"] = str(path)
    with pytest.raises(ConfigError, match="DB_PASSWORD_FILE=.*not UTF-8"):
        config.settings(env)


def test_a_secret_file_named_in_the_env_file_is_read(tmp_path, monkeypatch):
    secret = _secret_file(tmp_path, "pw", "pw-from-file\n")
    dotenv = tmp_path / "custom.env"
    dotenv.write_text(f"DB_PASSWORD_FILE={secret}\n")
    monkeypatch.setenv("PIPELINE_ENV_FILE", str(dotenv))
    monkeypatch.delenv("DB_PASSWORD", raising=False)
    assert config.resolve_secret_files(config.environment())["DB_PASSWORD"] == "pw-from-file"


def test_a_relative_secret_file_is_taken_from_the_project_folder(tmp_path):
    name = f".test-secret-{tmp_path.name}"
    path = config.ROOT / name
    path.write_text("relative-secret\n")
    try:
        assert config.resolve_secret_files({"DB_PASSWORD_FILE": name})["DB_PASSWORD"] == "relative-secret"
    finally:
        path.unlink()


def test_settings_say_why_each_service_is_the_one_it_is_and_why_the_fallback_is_off(tmp_path, monkeypatch,
                                                                                     embedded_env):
    """What a run prints as it starts, and what the preflight adds when the API is down: a MINIO_URL in
    `.env` (or exported from `stack env`) makes the store "configured", which turns the fallback off."""
    dotenv = tmp_path / "custom.env"
    dotenv.write_text("MINIO_URL=http://127.0.0.1:9\nMINIO_ACCESS_KEY=a\nMINIO_SECRET_KEY=b\n")
    monkeypatch.setenv("PIPELINE_ENV_FILE", str(dotenv))
    for name in ("MINIO_URL", "DB_HOST", "SNAPSHOT_FALLBACK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIPELINE_STATE_DIR", embedded_env[0]["PIPELINE_STATE_DIR"])
    why = config.settings(config.environment()).why
    assert why["object_store"] == f"MINIO_URL from {dotenv}"
    assert why["database"] == "embedded: DB_HOST is not set"
    assert why["snapshot_fallback"].startswith(f"the default with a configured object store (MINIO_URL from {dotenv})")
    monkeypatch.setenv("MINIO_URL", "http://127.0.0.1:9")  # exported, as `stack env` prints it
    monkeypatch.setenv("SNAPSHOT_FALLBACK", "true")
    why = config.settings(config.environment()).why
    assert why["object_store"] == "MINIO_URL from the environment"
    assert why["snapshot_fallback"] == "SNAPSHOT_FALLBACK=true from the environment"
    monkeypatch.delenv("MINIO_URL")
    monkeypatch.setenv("PIPELINE_ENV_FILE", "")
    monkeypatch.delenv("SNAPSHOT_FALLBACK")
    why = config.settings(config.environment()).why
    assert why == {"object_store": "embedded: MINIO_URL is not set", "database": "embedded: DB_HOST is not set",
                   "snapshot_fallback": "the default with the embedded object store"}
