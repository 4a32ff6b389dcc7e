# Set-up and everyday commands. Everything installs into .venv; nothing needs root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
RUN_STAMP := $(VENV)/.installed
CONFIG ?= config/example.yaml
HOST ?= 127.0.0.1
PORT ?= 8000

LLM_CACHE_DIR ?= $(HOME)/.cache/llm-ratelimit-proxy

.PHONY: run test test-llm cluster lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(RUN_STAMP)

# The admin page's browser test drives Debian's chromium with playwright-core (no browser download).
BROWSER_DEPS := tests/browser/node_modules/.installed
$(BROWSER_DEPS): tests/browser/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix tests/browser --no-audit --no-fund --silent && touch $@; \
	else echo "npm not found: the admin page's browser test will be skipped"; fi

run: $(RUN_STAMP)
	$(PY) -m proxy serve --config $(CONFIG) --host $(HOST) --port $(PORT)

test: $(STAMP) $(BROWSER_DEPS)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# End-to-end suite against a real llama-server and SmolLM2-135M; the first run builds them into
# $(LLM_CACHE_DIR) (about 5 minutes on 2 cores), later runs reuse the cache.
test-llm: $(STAMP)
	PYTHON="$(CURDIR)/$(PY)" LLM_CACHE_DIR="$(LLM_CACHE_DIR)" bash tests/llm/build_llama.sh
	RUN_LLM_TESTS=1 PYTHON="$(CURDIR)/$(PY)" LLM_CACHE_DIR="$(LLM_CACHE_DIR)" \
		$(PY) -m pytest -q tests/llm $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# A local cluster (Procfile): Redis, the mock upstream, three proxy nodes on 8003-8005.
cluster: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/honcho start -f Procfile

# The benchmark: every variant, one table, an HTML report (BENCH_ARGS=--quick for ~30 s).
bench: $(STAMP)
	$(PY) -m loadtest.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
