# One task file for developers, hooks and CI. Targets bootstrap their own virtualenv (.venv),
# so on a fresh machine `make run` and `make test` are all it takes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
# protos/google/rpc is vendored for other languages; Python has it from googleapis-common-protos.
# The generated Python code lives in the client's distribution, which ships it (and the server
# depends on that distribution).
GEN := clients/python/gen
PROTOS := $(shell find protos/chatsession -name '*.proto' | sort)

.PHONY: venv run test lint fmt gen gen-check docs lock lock-check bench bench-smoke soak soak-short check clean

# Two distributions, both editable, in one pip call: the server's (root) depends on the client's
# (clients/python), and naming both lets pip take chatsession-client from the tree, not an index.
# The client comes with its adapter extras: their tests run in this virtualenv (the frameworks'
# pins agree with the server's; tests/test_adapter_apps.py checks them beside google-adk too).
$(BIN)/chatsession-server: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e './clients/python[openai-agents,langchain]' -e '.[dev]'
	touch $@

# google-adk pins opentelemetry-api<=1.44 and the server needs 1.45: the ADK adapter's tests and
# type check run in a virtualenv of their own with the client, the [adk] extra (its release pinned
# here) and the test tools at the server's dev pins. tests/test_adk.py runs tests/adk/ in it.
ADK_VENV ?= .venv-adk
ADK_BIN := $(ADK_VENV)/bin
ADK_PINS := google-adk==2.13.0 pytest==9.2.0 pytest-asyncio==1.5.0 pytest-timeout==2.4.0 mypy==2.4.1 \
	types-protobuf==7.35.1.20260906 types-grpcio==1.85.0.20261028
$(ADK_BIN)/adk-ready: clients/python/pyproject.toml Makefile
	$(PYTHON) -m venv $(ADK_VENV)
	$(ADK_BIN)/python -m pip install --quiet --upgrade pip
	$(ADK_BIN)/python -m pip install --quiet -e './clients/python[adk]' $(ADK_PINS)
	touch $@

venv: $(BIN)/chatsession-server $(ADK_BIN)/adk-ready

run: venv  ## run the server with an embedded Valkey on 127.0.0.1:50051
	$(BIN)/chatsession-server

test: venv  ## the whole test suite, against standalone Valkey and against a local Valkey Cluster
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m pytest --valkey-cluster $(PYTEST_ARGS)

gen: venv  ## regenerate clients/python/gen/ from protos/
	rm -rf $(GEN)/chatsession
	mkdir -p $(GEN)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=$(GEN) --grpc_python_out=$(GEN) \
		--mypy_out=quiet:$(GEN) --mypy_grpc_out=only_async,quiet:$(GEN) $(PROTOS)
	touch $(GEN)/chatsession/v1/py.typed  # PEP 561: a user's type checker reads the stubs beside it

gen-check: venv  ## fail if clients/python/gen/ differs from what protos/ generate
	rm -rf .gen-check && mkdir -p .gen-check
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=.gen-check --grpc_python_out=.gen-check \
		--mypy_out=quiet:.gen-check --mypy_grpc_out=only_async,quiet:.gen-check $(PROTOS)
	touch .gen-check/chatsession/v1/py.typed
	diff -r .gen-check/chatsession $(GEN)/chatsession || (echo "$(GEN)/ is stale: run 'make gen'"; exit 1)
	rm -rf .gen-check

lint: venv  ## ruff, mypy --strict, buf lint, buf format
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(ADK_BIN)/mypy clients/python/chatsession_client/adk.py tests/adk/*.py
	$(BIN)/buf lint
	$(BIN)/buf format -d --exit-code
	$(BIN)/hadolint --failure-threshold warning Dockerfile

fmt: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/buf format -w

docs: venv  ## write README.md's generated tables (configuration)
	$(BIN)/python tools/readme_tables.py

# requirements.lock pins what the image installs, with hashes. An existing pin stays while it still
# satisfies pyproject.toml: `make lock` changes only what the dependencies' change needs
# (`make lock LOCK_ARGS=--upgrade` moves everything to the newest allowed).
# The server depends on chatsession-client, which is this tree's clients/python, not a package on
# an index: pyproject.toml's [tool.uv.sources] points uv at that folder, so the client's own
# dependencies are resolved and pinned with the server's, and --no-emit-package leaves the client
# itself out of the lock (a local folder has no hash to pin; the image installs it with --no-deps).
LOCK_COMPILE = $(BIN)/uv pip compile pyproject.toml --quiet --generate-hashes --universal \
	--python-version 3.12 --no-emit-package chatsession-client --custom-compile-command 'make lock'

lock: venv  ## re-lock requirements.lock after pyproject.toml's (or clients/python's) dependencies changed
	$(LOCK_COMPILE) $(LOCK_ARGS) -o requirements.lock

lock-check: venv  ## fail if requirements.lock does not match pyproject.toml's dependencies
	rm -rf .lock-check && mkdir -p .lock-check && cp requirements.lock .lock-check/
	$(LOCK_COMPILE) -o .lock-check/requirements.lock
	diff -u requirements.lock .lock-check/requirements.lock || (echo "requirements.lock is stale: run 'make lock'"; exit 1)
	rm -rf .lock-check

bench: venv  ## benchmarks: figures and ratios against in-run baselines (a few minutes; writes bench/results.json)
	$(BIN)/python bench/suite.py $(BENCH_ARGS)

bench-smoke: venv  ## every benchmark row once with tiny counts (seconds); checks the results file has them all
	$(BIN)/python bench/suite.py --smoke

# Hostile but legal load on loopback (bench/soak.py): the watch fan-out, stalled watchers and
# unauthenticated bytes, with figures and their targets. The short form (CI) checks the targets of
# SOAK_SHORT_CHECKS only; the others are printed.
SOAK_SHORT_CHECKS ?= unauthenticated,stalled,fanout

soak: venv  ## every soak scenario at the full counts (about a minute); exit 1 when a target is missed
	$(BIN)/python bench/soak.py --check $(SOAK_ARGS)

soak-short: venv  ## the soak at small counts (about 15 seconds), checking SOAK_SHORT_CHECKS' targets
	$(BIN)/python bench/soak.py --short --check $(SOAK_SHORT_CHECKS) $(SOAK_ARGS)

check: lint gen-check lock-check test

clean:
	rm -rf $(VENV) $(ADK_VENV) .gen-check .lock-check .pytest_cache .mypy_cache .ruff_cache
