# bridge: `make demo` runs the main job on embedded defaults, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The same .env every entry point reads (plain KEY=value lines; values there win, as in dagster dev).
-include .env
export BRIDGE_HOME ?= $(CURDIR)/.bridge
export DAGSTER_HOME ?= $(BRIDGE_HOME)/dagster
export WHYLOGS_NO_ANALYTICS := True
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo dev mlflow serve stop test bench lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==25.3"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

$(DAGSTER_HOME):
	mkdir -p $(DAGSTER_HOME) && touch $(DAGSTER_HOME)/dagster.yaml

demo: install $(DAGSTER_HOME)
	$(BIN)/python -m bridge_assets.demo

dev: install $(DAGSTER_HOME)
	$(BIN)/dagster dev -w workspace.yaml

mlflow: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(BRIDGE_HOME)/mlflow/mlflow.db --host 127.0.0.1 --port 5000

serve: install
	$(BIN)/python -m serving.deploy

stop: install
	$(BIN)/python -m serving.cluster stop

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/features.py --rows 1000000
	$(BIN)/python bench/train.py --rows 200000
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/simulate.py --rows 10000000
	$(BIN)/python bench/serve_load.py

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' > constraints.new && mv constraints.new constraints.txt

clean:
	rm -rf $(BRIDGE_HOME)
