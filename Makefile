# One task file for developers, hooks and CI. Targets bootstrap their own virtualenv (.venv),
# so on a fresh machine `make run` and `make test` are all it takes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
# protos/google/rpc is vendored for other languages; Python has it from googleapis-common-protos.
PROTOS := $(shell find protos/chatsession -name '*.proto' | sort)

.PHONY: venv run test lint fmt gen gen-check docs lock lock-check bench bench-smoke check clean

$(BIN)/chatsession-server: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/chatsession-server

run: venv  ## run the server with an embedded Valkey on 127.0.0.1:50051
	$(BIN)/chatsession-server

test: venv  ## the whole test suite, against standalone Valkey and against a local Valkey Cluster
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m pytest --valkey-cluster $(PYTEST_ARGS)

gen: venv  ## regenerate gen/ from protos/
	rm -rf gen/chatsession
	mkdir -p gen
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen \
		--mypy_out=quiet:gen --mypy_grpc_out=only_async,quiet:gen $(PROTOS)

gen-check: venv  ## fail if gen/ differs from what protos/ generate
	rm -rf .gen-check && mkdir -p .gen-check
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=.gen-check --grpc_python_out=.gen-check \
		--mypy_out=quiet:.gen-check --mypy_grpc_out=only_async,quiet:.gen-check $(PROTOS)
	diff -r .gen-check/chatsession gen/chatsession || (echo "gen/ is stale: run 'make gen'"; exit 1)
	rm -rf .gen-check

lint: venv  ## ruff, mypy --strict, buf lint, buf format
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
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
LOCK_COMPILE = $(BIN)/uv pip compile pyproject.toml --quiet --generate-hashes --universal \
	--python-version 3.12 --custom-compile-command 'make lock'

lock: venv  ## re-lock requirements.lock after pyproject.toml's dependencies changed
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

check: lint gen-check lock-check test

clean:
	rm -rf $(VENV) .gen-check .lock-check .pytest_cache .mypy_cache .ruff_cache
