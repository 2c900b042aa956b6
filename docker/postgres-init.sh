#!/bin/sh
# Run once by the postgres image when it initialises an empty data folder (/docker-entrypoint-initdb.d):
# POSTGRES_USER is the cluster's administrator; the pipeline gets a role of its own, without superuser,
# createdb or createrole, which owns its database and that database's public schema, and nothing else.
set -eu
# The pipeline's password: from the Docker secret named by APP_DB_PASSWORD_FILE, or APP_DB_PASSWORD.
app_password="${APP_DB_PASSWORD:-}"
if [ -n "${APP_DB_PASSWORD_FILE:-}" ]; then app_password=$(cat "$APP_DB_PASSWORD_FILE"); fi
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v app_user="$APP_DB_USER" -v app_password="$app_password" -v app_db="$APP_DB_NAME" <<'SQL'
CREATE ROLE :"app_user" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'app_password';
CREATE DATABASE :"app_db" OWNER :"app_user";
REVOKE ALL ON DATABASE :"app_db" FROM PUBLIC;
\connect :"app_db"
ALTER SCHEMA public OWNER TO :"app_user";
REVOKE ALL ON SCHEMA public FROM PUBLIC;
SQL
