# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck check bench reset clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/parley dev

# The real Vercel AI SDK, from the npm registry, for tests/test_ai_sdk.py.
AI_SDK := tests/ai_sdk/node_modules/.installed
$(AI_SDK): tests/ai_sdk/package.json tests/ai_sdk/package-lock.json
	cd tests/ai_sdk && npm ci --no-audit --no-fund --loglevel=error
	touch $(AI_SDK)

# The suite starts its own NATS, Postgres and Redis from the installed wheels.
test: $(STAMP) $(AI_SDK)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/parley bench stream

# Start over with empty servers, keeping the virtualenv. Stop `make run` first.
reset:
	rm -rf .parley

clean:
	rm -rf $(VENV) .parley .pytest_cache .mypy_cache .ruff_cache
