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
# The UIs' ports (`make dev BRIDGE_DAGSTER_PORT=3001`, `make mlflow BRIDGE_MLFLOW_PORT=5001`, or in
# .env); runs link to the MLflow UI on BRIDGE_MLFLOW_PORT, so give both targets the same value.
export BRIDGE_DAGSTER_PORT ?= 3000
export BRIDGE_MLFLOW_PORT ?= 5000
# `make stack` writes the production-shaped stack's environment here (deploy/stack.py); while it
# exists, demo and serve apply it (BRIDGE_ENV_FILE, instead of .env) and so run on the stack.
STACK_ENV := $(or $(BRIDGE_STACK_DIR),$(BRIDGE_HOME)/stack)/stack.env
ifneq ($(wildcard $(STACK_ENV)),)
demo serve: export BRIDGE_ENV_FILE := $(STACK_ENV)
endif

.PHONY: lint fuzz instance test-stack install demo dev mlflow serve stop test bench bench-deps lock clean stack stack-stop system-deps test-deps

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "installing bridge and its pinned dependencies into $(VENV) (constraints.txt; about 2 minutes the first time)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==25.3"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The embedded Dagster instance: its dagster.yaml with telemetry off (bridge_assets.lake.settings).
instance: install
	@$(BIN)/python -c "from bridge_assets.lake.settings import load_environment; load_environment()"

demo: install instance
	$(BIN)/python -m bridge_assets.demo

dev: install instance
ifneq ($(wildcard $(STACK_ENV)),)
	@echo "the stack runs Dagster's webserver and daemon: $$(sed -n 's/^BRIDGE_DAGSTER_URL=//p' $(STACK_ENV))"
else
	$(BIN)/dagster dev -w workspace.yaml --host 127.0.0.1 --port $(BRIDGE_DAGSTER_PORT)
endif

mlflow: install
ifneq ($(wildcard $(STACK_ENV)),)
	@echo "the stack runs an MLflow server: $$(sed -n 's/^MLFLOW_TRACKING_URI=//p' $(STACK_ENV))"
else
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(BRIDGE_HOME)/mlflow/mlflow.db --host 127.0.0.1 --port $(BRIDGE_MLFLOW_PORT)
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

# The stack's file-backed S3 server (s3rver from npm, pinned by deploy/s3/package-lock.json).
S3_SERVER_DEPS := deploy/s3/node_modules/.package-lock.json
$(S3_SERVER_DEPS): deploy/s3/package.json deploy/s3/package-lock.json
	cd deploy/s3 && npm ci --no-audit --no-fund --loglevel=error

# `make stack` runs the loop at the demo's cadences (so `make demo` closes it on the stack in
# minutes); `make stack STACK_OPTIONS=` keeps every cadence at its default.
STACK_OPTIONS ?= --demo-cadences
stack: install system-deps $(S3_SERVER_DEPS)
	$(BIN)/python -m deploy.stack start $(STACK_OPTIONS)

stack-stop: install
	$(BIN)/python -m deploy.stack stop

# The lint gate (ruff's checks and formatting, mypy with setup.cfg's flags) on the product's code;
# `make test` runs it before pytest, so .ci/run enforces it.
LINTED := bridge_assets serving
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy $(LINTED)

# Two pytest processes side by side: the tests marked `apart` (the demo and the stack bring up
# their own Ray and Dagster) and the rest (sharing one Ray, one `dagster dev`, one moto). The
# apart run's output is printed after the other's; the target fails if either run does.
# A native crash (segfault) writes every thread's stack to test-artifacts/crash-<run>.log; the
# crashed thread's is printed at the end, where CI's shortened output keeps it.
APART_LOG := test-artifacts/pytest-apart.log
test: install lint system-deps test-deps $(S3_SERVER_DEPS)
	@mkdir -p $(dir $(APART_LOG))
	@echo "pytest -m apart (the demo, the stack) runs beside the rest; its output: $(APART_LOG)"
	@BRIDGE_TEST_CRASH_LOG=test-artifacts/crash-apart.log \
	  $(BIN)/python -m pytest -q -p no:cacheprovider -m apart > $(APART_LOG) 2>&1 & apart=$$!; \
	  BRIDGE_TEST_CRASH_LOG=test-artifacts/crash-rest.log \
	  $(BIN)/python -m pytest -q -p no:cacheprovider -m "not apart"; shared=$$?; \
	  wait $$apart; apart_status=$$?; echo; echo "=== pytest -m apart"; cat $(APART_LOG); \
	  echo "=== make test: rest exited $$shared, apart exited $$apart_status"; \
	  for run in rest apart; do if grep -q "^Fatal Python error" test-artifacts/crash-$$run.log 2>/dev/null; then \
	    echo "=== pytest ($$run) crashed; the crashed thread's top frames (all threads: test-artifacts/crash-$$run.log)"; \
	    awk '/^Fatal Python error/ {print} /^Current thread/ {on=1} on && (/^$$/ || ++n > 14) {exit} on {print}' test-artifacts/crash-$$run.log; \
	  fi; done; \
	  exit $$(( shared || apart_status ))

# The production-shaped stack end to end (Postgres, MLflow server, two Ray nodes, Dagster daemon).
test-stack: install system-deps $(S3_SERVER_DEPS)
	$(BIN)/python -m pytest -q -m stack bridge_assets_tests/test_stack.py

# Randomized fuzzing of the service from its OpenAPI schema: a new seed each run (printed; replay
# with BRIDGE_FUZZ_SEED=<seed>), BRIDGE_FUZZ_SCALE times the examples of the fixed run in make test.
fuzz: install
	BRIDGE_FUZZ_SEED=$${BRIDGE_FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')} BRIDGE_FUZZ_SCALE=$${BRIDGE_FUZZ_SCALE:-5} \
	  $(BIN)/python -m pytest -q -s -p no:cacheprovider bridge_assets_tests/test_fuzz.py

# wrk from Debian drives bench/serve_load.py (a C load generator takes little of the two cores).
bench-deps:
	@command -v wrk >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q wrk; }

# Every bench the README cites, at its sizes, one after another (bench/all.py prints the time of each); each one's
# ratios and goals are printed again at the end.
bench: install bench-deps
	$(BIN)/python bench/all.py

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' > constraints.new && mv constraints.new constraints.txt

clean:
	rm -rf $(BRIDGE_HOME)
