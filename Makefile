# The two commands of the README: `make demo` and `make test`. Both set everything up.
#
# Unless ABC_TEST_SERVER_URL / ABC_DEMO_DATABASE_URL (and ABC_TEST_BROKER_URL) name servers to use,
# they run against a throwaway PostgreSQL cluster and a throwaway Redis of this checkout's own
# (scripts/ensure-postgres.sh, scripts/ensure-redis.sh: ./var/pg, ./var/redis, loopback, own ports),
# never the machine's. Both keep running for the next command: `make stop` stops them. `make test`
# also needs a headless chromium (scripts/ensure-chromium.sh installs Debian's when it is missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup postgres redis demo test lint bench stop clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

postgres:
	@scripts/ensure-postgres.sh

redis:
	@scripts/ensure-redis.sh

demo: setup
	url="$${ABC_DEMO_DATABASE_URL:-$$(scripts/ensure-postgres.sh abc_demo)}" && \
	ABC_DEMO_DATABASE_URL="$$url" $(BIN)/python scripts/demo.py

test: setup
	$(BIN)/ruff check .
	url="$${ABC_TEST_SERVER_URL:-$$(scripts/ensure-postgres.sh)}" && \
	broker="$${ABC_TEST_BROKER_URL:-$$(scripts/ensure-redis.sh)}" && \
	chromium="$${ABC_TEST_CHROMIUM:-$$(scripts/ensure-chromium.sh)}" && \
	ABC_TEST_SERVER_URL="$$url" ABC_TEST_BROKER_URL="$$broker" ABC_TEST_CHROMIUM="$$chromium" \
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

stop:
	@scripts/stop-services.sh

clean: stop
	rm -rf $(VENV) var demo .pytest_cache
