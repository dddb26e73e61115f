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
# `make stack` writes the production-shaped stack's environment here (deploy/stack.py); while it
# exists, demo and serve apply it (BRIDGE_ENV_FILE, instead of .env) and so run on the stack.
STACK_ENV := $(or $(BRIDGE_STACK_DIR),$(BRIDGE_HOME)/stack)/stack.env
ifneq ($(wildcard $(STACK_ENV)),)
demo serve: export BRIDGE_ENV_FILE := $(STACK_ENV)
endif

.PHONY: test-stack install demo dev mlflow serve stop test bench bench-deps lock clean stack stack-stop system-deps test-deps

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
ifneq ($(wildcard $(STACK_ENV)),)
	@echo "the stack runs Dagster's webserver and daemon: $$(sed -n 's/^BRIDGE_DAGSTER_URL=//p' $(STACK_ENV))"
else
	$(BIN)/dagster dev -w workspace.yaml
endif

mlflow: install
ifneq ($(wildcard $(STACK_ENV)),)
	@echo "the stack runs an MLflow server: $$(sed -n 's/^MLFLOW_TRACKING_URI=//p' $(STACK_ENV))"
else
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(BRIDGE_HOME)/mlflow/mlflow.db --host 127.0.0.1 --port 5000
endif

serve: install
	$(BIN)/python -m serving.deploy

stop: install
	$(BIN)/python -m serving.cluster stop

# PostgreSQL from Debian for the stack and its tests (idempotent; needs root or sudo the first time).
system-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q postgresql; }

# Headless Chromium from Debian for the browser tests; Playwright drives it and downloads nothing.
test-deps:
	@test -x /usr/bin/chromium || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }

# `make stack` runs the loop at the demo's cadences (so `make demo` closes it on the stack in
# minutes); `make stack STACK_OPTIONS=` keeps every cadence at its default.
STACK_OPTIONS ?= --demo-cadences
stack: install system-deps
	$(BIN)/python -m deploy.stack start $(STACK_OPTIONS)

stack-stop: install
	$(BIN)/python -m deploy.stack stop

test: install system-deps test-deps
	$(BIN)/python -m pytest -q

# The production-shaped stack end to end (Postgres, MLflow server, two Ray nodes, Dagster daemon).
test-stack: install system-deps
	$(BIN)/python -m pytest -q -m stack bridge_assets_tests/test_stack.py

# wrk from Debian drives bench/serve_load.py (a C load generator takes little of the two cores).
bench-deps:
	@command -v wrk >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q wrk; }

bench: install bench-deps
	$(BIN)/python bench/features.py --rows 2000000
	$(BIN)/python bench/train.py --rows 200000
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/simulate.py --rows 10000000
	$(BIN)/python bench/serve_load.py

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' > constraints.new && mv constraints.new constraints.txt

clean:
	rm -rf $(BRIDGE_HOME)
