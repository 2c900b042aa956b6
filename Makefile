# Set-up commands of the README. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Apache Airflow, for the DAG in airflow/: a virtual environment of its own (its pins are not ours).
AIRFLOW_VENV := .venv-airflow

.PHONY: run test lab stack-up stack-down stack-status bench clean airflow-venv

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	@touch $@

## run: the whole pipeline (the embedded stack unless .env configures services); ARGS="--stages 2-4" etc.
run: $(VENV)/.installed
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

## test: the whole suite against real services (starts its own embedded stack and HTTP server)
test: $(VENV)/.installed-dev $(AIRFLOW_VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## lab: JupyterLab on notebooks/, on the same stack as `make run`
lab: $(VENV)/.installed
	$(BIN)/python run_pipeline.py lab

stack-up stack-down stack-status: $(VENV)/.installed
	$(BIN)/python run_pipeline.py stack $(subst stack-,,$@)

## bench: speed and memory figures of the pipeline's hot paths
bench: $(VENV)/.installed
	$(BIN)/python bench/benchmark.py

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) .pytest_cache
