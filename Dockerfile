# The worker image: the project and its virtual environment, for Airflow tasks in containers
# (KubernetesPodOperator, DockerOperator; docs/schedule.md, "Workers as containers") or a run by hand:
#
#   docker build -t countries-medallion:0.1.0 .
#   docker run --rm --env-file worker.env countries-medallion:0.1.0 --stages 1 --run-id X
#
# No secrets are in it (.dockerignore keeps out .env, secrets/, .state/, outputs/runs/, logs/).
# Settings come from the container's environment: real services named by MINIO_URL, DB_HOST, ...
# (.env.example, docs/stack.md) and each credential as <NAME> or <NAME>_FILE (a mounted Kubernetes
# or Docker secret). A container must never rely on the embedded stack, which starts inside it when
# MINIO_URL or DB_HOST is unset: its data would die with the container, and no other worker sees it.
FROM python:3.11.14-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A user of its own: the project's files stay root's and read-only to the runner.
RUN groupadd --system --gid 10001 medallion \
    && useradd --system --no-log-init --uid 10001 --gid medallion --create-home \
       --home-dir /home/medallion --shell /usr/sbin/nologin medallion

# The project folder; its virtual environment is .venv/ in it, where the DAG (MEDALLION_PYTHON's
# default, <home>/.venv/bin/python) and the runner's hints (lib/hints.py) look for it.
WORKDIR /opt/countries-medallion

# requirements.txt, as `make run` installs it; its last line installs lib/ (editable), hence the
# files that build needs first. The whole project comes after, so a change to it alone reuses this layer
# unless it touches lib/.
COPY requirements.txt pyproject.toml README.md ./
COPY lib/ lib/
RUN python -m venv .venv \
    && .venv/bin/python -m pip install --no-cache-dir -r requirements.txt

COPY . .
# lib's bytecode, compiled once here (as `make bytecode` does): the runner may not write it, and with
# PYTHONDONTWRITEBYTECODE it would not try, so each run's processes would compile lib from source.
RUN .venv/bin/python -m compileall -q lib

# The folders a run writes (lib/config.py: outputs, logs, state), the only ones the user may write.
# Each pod's outputs/ is a working copy: the run records are kept in the object store.
ENV PIPELINE_OUTPUTS_DIR=/opt/countries-medallion/outputs \
    PIPELINE_LOGS_DIR=/opt/countries-medallion/logs \
    PIPELINE_STATE_DIR=/opt/countries-medallion/.state
RUN mkdir -p outputs logs .state \
    && chown medallion:medallion outputs logs .state

# By number, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001

# `docker run IMAGE --stages 1 --run-id X` is `run_pipeline.py --stages 1 --run-id X`; an Airflow task
# names the same Python with airflow/run_stage.py STAGE RUN_ID instead. With no arguments: the usage.
ENTRYPOINT ["/opt/countries-medallion/.venv/bin/python", "/opt/countries-medallion/run_pipeline.py"]
CMD ["--help"]
