# imagegate: `make run` starts the gateway on embedded defaults; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev run test proto docs envoy lint bench bench-render screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamps make repeated runs instant; they are redone when pyproject.toml changes.
$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev-deps: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.run-deps

install: $(VENV)/.run-deps

install-dev: $(VENV)/.dev-deps

run: install
	$(BIN)/imagegate serve --demo

test: install-dev
	$(BIN)/pytest

proto: install-dev
	$(BIN)/python proto/generate.py

# docs/configuration.md from the settings declared in the config dataclasses (a test
# fails when it is stale).
docs: install
	$(BIN)/imagegate config docs > docs/configuration.md

# Envoy in front of a running `imagegate serve` (or serve-grpc): REST on 127.0.0.1:10000.
# No hot restart: it would claim shared memory (base id 0) that another Envoy may hold.
envoy: install-dev
	$(BIN)/envoy -c envoy.yaml --log-level warn --disable-hot-restart

lint: install-dev
	$(BIN)/ruff check service gateway settings tests bench proto/generate.py
	$(BIN)/mypy

# Side by side on 127.0.0.1: the direct upstream, both fronts, gRPC and LiteLLM (about
# 5 minutes; installs LiteLLM into bench/.venv on first use). Rewrites docs/benchmarks.md.
bench: install-dev
	$(BIN)/python bench/bench.py

bench-render: install-dev
	$(BIN)/python bench/bench_render.py

# The web console's pages, light and dark and at 375 px, as its browser tests see them.
screenshots: install-dev
	IMAGEGATE_SCREENSHOTS=docs/console $(BIN)/pytest -q -p no:cacheprovider tests/test_console_browser.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
