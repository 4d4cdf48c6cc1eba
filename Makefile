# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The page's tests drive Debian's chromium (tests/test_page.py names the same path).
CHROMIUM := /usr/bin/chromium

.PHONY: run test lint typecheck check bench reset clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# A fresh machine (or CI's) has no browser: install Debian's package. No
# `playwright install`, which would download a browser build of its own. A
# machine where this cannot work fails here, loudly, instead of skipping tests.
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "$(CHROMIUM) is missing and there is no apt-get: install chromium by hand" >&2; exit 1; }
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -q
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends chromium fonts-dejavu-core
	@test -x $(CHROMIUM) || { echo "apt-get installed chromium, but $(CHROMIUM) is not there" >&2; exit 1; }

browser: $(CHROMIUM)

run: $(STAMP)
	$(BIN)/parley dev

# The real Vercel AI SDK, from the npm registry, for tests/test_ai_sdk.py.
AI_SDK := tests/ai_sdk/node_modules/.installed
$(AI_SDK): tests/ai_sdk/package.json tests/ai_sdk/package-lock.json
	cd tests/ai_sdk && npm ci --no-audit --no-fund --loglevel=error
	touch $(AI_SDK)

# The suite starts its own NATS, Postgres and Redis from the installed wheels: one
# set per pytest-xdist worker. Two workers on two cores: most of a test is waiting
# (for a lease to lapse, a server to come back, a stream to end), not computing.
test: $(STAMP) $(AI_SDK) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q -n 2

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
