"""docker-compose.yml is a valid Compose file: checked against the Compose Specification's JSON schema
(tests/compose_spec/), as written and with `.env.example`'s values interpolated as Compose does."""

from __future__ import annotations

import json

import jsonschema
import pytest
from dotenv import dotenv_values

from tests import compose

SCHEMA = json.loads((compose.ROOT / "tests" / "compose_spec" / "compose-spec.json").read_text(encoding="utf-8"))


def problems(document: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


def test_the_schema_is_the_compose_specification():
    assert SCHEMA["title"] == "Compose Specification"
    assert "name" in SCHEMA["properties"] and "secrets" in SCHEMA["properties"]


def test_the_compose_file_as_written_follows_the_specification():
    assert problems(compose.raw()) == []


def test_the_compose_file_with_env_example_follows_the_specification():
    env = {k: v for k, v in dotenv_values(compose.ROOT / ".env.example").items() if v is not None}
    document = compose.load(env)
    assert problems(document) == []
    assert document["services"]["postgres"]["environment"]["APP_DB_USER"] == env["DB_USER"]
    assert document["services"]["minio-init"]["environment"]["BUCKETS"].split() == [
        env["BUCKET_NAME"], env["CLEAN_BUCKET"], env["GOLD_BUCKET"], env["RECORDS_BUCKET"], env["S3_BUCKET_NAME"]]


def test_the_schema_catches_what_compose_would_refuse():
    """The check has teeth: a misspelt key, a list written as a string, an unknown key in a secret."""
    document = compose.raw()
    document["services"]["postgres"]["healthchek"] = document["services"]["postgres"].pop("healthcheck")
    document["services"]["minio"]["ports"] = "127.0.0.1:9000:9000"
    document["secrets"]["db_password"] = {"path": "./secrets/db_password"}
    found = problems(document)
    assert any(p.startswith("services/postgres:") and "healthchek" in p for p in found), found
    assert any(p.startswith("services/minio/ports:") for p in found), found
    assert any(p.startswith("secrets/db_password:") for p in found), found


@pytest.mark.parametrize("missing", ["DB_USER", "DB_NAME"])
def test_interpolation_refuses_what_compose_refuses(missing):
    env = {k: v for k, v in dotenv_values(compose.ROOT / ".env.example").items() if v is not None}
    del env[missing]
    with pytest.raises(compose.InterpolationError, match=f"{missing}: set {missing} in .env"):
        compose.load(env)
