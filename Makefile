# One task file for developers, hooks and CI. Targets bootstrap their own virtualenv (.venv),
# so on a fresh machine `make run` and `make test` are all it takes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
PROTOS := $(shell find protos -name '*.proto' | sort)

.PHONY: venv run test lint fmt gen gen-check bench bench-smoke check clean

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

bench: venv  ## benchmarks: figures and ratios against in-run baselines (a few minutes; writes bench/results.json)
	$(BIN)/python bench/suite.py $(BENCH_ARGS)

bench-smoke: venv  ## every benchmark row once with tiny counts (seconds); checks the results file has them all
	$(BIN)/python bench/suite.py --smoke

check: lint gen-check test

clean:
	rm -rf $(VENV) .gen-check .pytest_cache .mypy_cache .ruff_cache
