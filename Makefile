# Set-up commands of the README. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Apache Airflow, for the DAG in airflow/: a virtual environment of its own (its pins are not ours).
AIRFLOW_VENV := .venv-airflow
CHROMIUM := /usr/bin/chromium
# PostgreSQL 15 from the OS packages: the server tests/e2e/test_compose_path.py initialises as the
# docker-compose.yml's postgres:15 image would.
POSTGRES15 := /usr/lib/postgresql/15/bin/postgres
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lab stack-up stack-down stack-status bench clean airflow-venv git-filters screenshots bytecode

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	@echo "Installing requirements.txt into $(VENV) (the first install takes a few minutes; later ones are quick)"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	@echo "Installing requirements-dev.txt into $(VENV) (test tools)"
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	@touch $@

# lib's bytecode, compiled ahead as pip compiles the packages it installs: where PYTHONDONTWRITEBYTECODE
# is set, each of a run's processes (the runner, its kernel) compiled lib from source at every start.
# Only what changed is compiled again; a module edited later is compiled in memory as usual.
bytecode: $(VENV)/.installed
	@$(BIN)/python -m compileall -q lib

## run: the whole pipeline (the embedded stack unless .env configures services); ARGS="--stages 2-4" etc.
run: $(VENV)/.installed bytecode
	$(BIN)/python run_pipeline.py $(ARGS)

$(AIRFLOW_VENV)/.installed: airflow/requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'
	rm -rf $(AIRFLOW_VENV)
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet -r airflow/requirements.txt
	@touch $@

## airflow-venv: Apache Airflow 3 in .venv-airflow/ (installed once; again only when its pins change)
airflow-venv: $(AIRFLOW_VENV)/.installed

## test: the whole suite against real services, on TEST_WORKERS pytest-xdist workers (each starts its own
## embedded stack and HTTP server); TEST_WORKERS=0 runs it in one process, PYTEST_ARGS="tests/test_x.py" one file
# A test file runs whole on one worker (--dist loadfile): its module fixtures run once. Files go out in the
# order pytest collects them (tests/e2e first, the longest), not by their number of tests. Three workers on
# two cores: the tests wait on servers and kernels often enough for a third to fill the gaps (fresh clones,
# 6 Dec: 2 workers 11:16-12:42 of pytest, 3 workers 10:30-10:39, 4 workers 13:22; docs/benchmark.md).
TEST_WORKERS ?= 3
test: $(VENV)/.installed-dev $(AIRFLOW_VENV)/.installed $(CHROMIUM) $(POSTGRES15) bytecode
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

## chromium: the headless browser the page tests drive, from the OS packages (installed when missing)
$(CHROMIUM):
	@echo "Installing Chromium from the OS packages for the browser tests (once, a minute or two)"
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

## postgresql-15: the Compose path's database server for its test, from the OS packages (installed when missing)
$(POSTGRES15):
	@echo "Installing PostgreSQL 15 from the OS packages for the Compose-path test (once, a minute)"
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql-15

## lab: JupyterLab on notebooks/, on the same stack as `make run`; ARGS="--port 8899" picks the port
lab: $(VENV)/.installed git-filters bytecode
	$(BIN)/python run_pipeline.py lab $(ARGS)

## git-filters: notebooks saved in the lab reach git as committed (nbstripout as a git filter)
# Besides outputs and counts, the filter drops what the kernel writes into a notebook's metadata
# (language_info: Python's version and the like); the committed notebooks carry only the kernelspec
# the lab writes, so what git stores of a notebook run and saved in the lab is the committed file
# (and the lab's save hook, lib/lab.py, keeps `git status` from listing it).
git-filters: $(VENV)/.installed
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git config filter.nbstripout.clean ".venv/bin/nbstripout --keep-id" && \
	  git config filter.nbstripout.smudge cat && \
	  git config filter.nbstripout.extrakeys "metadata.language_info" && \
	  git config diff.ipynb.textconv ".venv/bin/nbstripout --keep-id -t"; fi

## screenshots: docs/index.png, docs/report.png and docs/lab-report.png, from fresh runs (1,280 px wide)
screenshots: $(VENV)/.installed-dev $(CHROMIUM)
	$(BIN)/python docs/screenshots.py

stack-up stack-down stack-status: $(VENV)/.installed
	$(BIN)/python run_pipeline.py stack $(subst stack-,,$@)

## bench: speed and memory figures of the pipeline's hot paths
bench: $(VENV)/.installed bytecode
	$(BIN)/python -m bench.benchmark $(ARGS)

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) .pytest_cache
