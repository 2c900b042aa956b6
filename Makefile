# Set-up commands of the README. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lab stack-up stack-down stack-status bench clean

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

## test: the whole suite against real services (starts its own embedded stack and HTTP server)
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## lab: JupyterLab on notebooks/, on the same stack as `make run`
lab: $(VENV)/.installed
	$(BIN)/python run_pipeline.py lab

stack-up stack-down stack-status: $(VENV)/.installed
	$(BIN)/python run_pipeline.py stack $(subst stack-,,$@)

## bench: speed and memory figures of the pipeline's hot paths
bench: $(VENV)/.installed
	$(BIN)/python -m bench.benchmark $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
