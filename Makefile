# obsledger — `make run` starts the API on the embedded SQLite store; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test lint bench clean kcat wrk

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Start the API with the embedded default (SQLite event store, dispatcher and projector inside)
run: setup
	$(BIN)/obsledger serve --host 127.0.0.1 --port 8000

## The whole test suite (SQLite and PostgreSQL; PostgreSQL tests skip unless
## OBSLEDGER_REQUIRE_SERVICES=1, where they fail if the server is missing)
test: setup kcat
	$(BIN)/pytest

## Debian's kcat: the independent Kafka client of the end-to-end relay test
kcat:
	@command -v kcat >/dev/null || { apt-get install -y -q kcat >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q kcat >/dev/null; } || \
	  echo "kcat could not be installed: the Kafka end-to-end test will say so"; }

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

## Benchmarks against PostgreSQL (OBSLEDGER_POSTGRES_HOST/PORT/USER select the server)
## Debian's wrk: the HTTP load generator of bench/commands.py (else an aiohttp client, which
## saturates before the server does and understates every HTTP figure)
wrk:
	@command -v wrk >/dev/null || { apt-get install -y -q wrk >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; } || \
	  echo "wrk could not be installed: bench/commands.py falls back to aiohttp"; }

bench: setup wrk
	$(BIN)/python bench/commands.py
	$(BIN)/python bench/projection.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/replay.py
	$(BIN)/python bench/results.py
	$(BIN)/python bench/downloads.py
	$(BIN)/python bench/processing.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
