# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
export MLOC_HOME ?= $(CURDIR)/.mloc
export DAGSTER_HOME ?= $(MLOC_HOME)/dagster
BIN := $(CURDIR)/$(VENV)/bin

.PHONY: setup demo ui test lint bench clean

setup:
	@bash scripts/setup.sh
	@mkdir -p "$(DAGSTER_HOME)" && ln -sf "$(CURDIR)/dagster.yaml" "$(DAGSTER_HOME)/dagster.yaml"

demo: setup
	$(BIN)/mloc demo $(DEMO_ARGS)

ui: setup  # dagster dev; Ctrl-C or SIGTERM stops it and every child within ~10 s
	$(BIN)/python -m mloc_dagster.cli.ui --host 127.0.0.1 --port 3000

test: setup
	@bash scripts/test.sh $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check mloc_dagster tests bench

bench: setup
	$(BIN)/python bench/ingest.py

clean:
	rm -rf .mloc
