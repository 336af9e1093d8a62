# obsledger — `make run` starts the API on the embedded SQLite store; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# the package and its runtime dependencies (make run); then the [dev] extra (make test, lint)
STAMP     := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.installed-dev-stamp
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup setup-dev run test test-unit lint bench clean kcat promtool wrk chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

# after $(STAMP): a changed pyproject.toml reinstalls both
$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

setup: $(STAMP)

setup-dev: $(DEV_STAMP)

## Start the API with the embedded default (SQLite event store, dispatcher and projector
## inside) on http://$(HOST):$(PORT) — `make run PORT=8080`
run: setup
	$(BIN)/obsledger serve --host $(HOST) --port $(PORT)

## The whole test suite (SQLite and PostgreSQL; PostgreSQL tests skip unless
## OBSLEDGER_REQUIRE_SERVICES=1, where they fail if the server is missing)
test: setup-dev kcat promtool chromium
	$(BIN)/pytest

## The fast tests, for the inner loop: tests/unit (handlers, unit of work, dispatcher over the
## in-memory event store; no database, server, broker or disk). `make test` runs them too.
## --confcutdir keeps tests/conftest.py (servers, the whole application) out of it, and only
## the timeout plugin is loaded (not schemathesis', hypothesis', zarr's: seconds of imports).
test-unit: setup-dev
	PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(BIN)/pytest -p pytest_timeout -q \
	  --confcutdir=tests/unit tests/unit

## Debian's kcat: the independent Kafka client of the end-to-end relay test
kcat:
	@command -v kcat >/dev/null || { apt-get install -y -q kcat >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q kcat >/dev/null; } || \
	  echo "kcat could not be installed: the Kafka end-to-end test will say so"; }

## Debian's chromium: the headless browser of the dashboard's test, driven by Playwright
## (the playwright package of the [dev] extra, with executable_path: no browser download)
chromium:
	@command -v chromium >/dev/null || { apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } || \
	  echo "chromium could not be installed: the dashboard's browser test will say so"; }

## promtool, from Debian's prometheus package: checks and unit-tests the alert rules in
## deploy/prometheus. Only the binary is taken (into the venv): installing the package would
## also start a Prometheus server wherever its init script runs.
promtool: $(STAMP)
	@command -v promtool >/dev/null || test -x $(BIN)/promtool || { \
	  tmp=$$(mktemp -d) && ( cd $$tmp && \
	    { apt-get download -q prometheus >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get download -q prometheus >/dev/null 2>&1; }; } && \
	    dpkg-deb -x prometheus_*.deb pkg && cp pkg/usr/bin/promtool $(CURDIR)/$(BIN)/promtool ); \
	  rm -rf $$tmp; test -x $(BIN)/promtool; } || \
	  echo "promtool could not be installed: the alert rules' tests will say so"

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

## Benchmarks against PostgreSQL (OBSLEDGER_POSTGRES_HOST/PORT/USER select the server)
## Debian's wrk: the HTTP load generator of bench/commands.py (else an aiohttp client, which
## saturates before the server does and understates every HTTP figure)
wrk:
	@command -v wrk >/dev/null || { apt-get install -y -q wrk >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; } || \
	  echo "wrk could not be installed: bench/commands.py falls back to aiohttp"; }

bench: setup-dev wrk chromium
	$(BIN)/python -m bench.commands
	$(BIN)/python -m bench.projection
	$(BIN)/python -m bench.relay
	$(BIN)/python -m bench.replay
	$(BIN)/python -m bench.results
	$(BIN)/python -m bench.downloads
	$(BIN)/python -m bench.processing
	$(BIN)/python -m bench.hostile_bodies
	$(BIN)/python -m bench.dashboard

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
