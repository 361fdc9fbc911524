# SPIKE for Python. `make test` and `make demo` install what they need themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PY      = $(BIN)/python
STAMP   = $(VENV)/.installed

.PHONY: install protos check-protos lint test test-fast bench bench-quick demo drill clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Regenerate the Python stubs (and .pyi type stubs) from protos/.
protos: $(STAMP)
	$(PY) -m spike._protogen --out .

# Fails when the committed stubs differ from what protos/ generates.
check-protos: $(STAMP)
	$(PY) -m spike._protogen --check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy spike nexus pilot devagent tests

test: $(STAMP) lint
	$(PY) -m spike._protogen --check
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m tests.bench

bench-quick: $(STAMP)
	$(PY) -m tests.bench --quick

demo: $(STAMP)
	$(BIN)/python -m tests.demo

# The recovery practice drill (docs/runbooks/drill.md) on a throwaway instance.
drill: $(STAMP)
	$(PY) -m tests.drill

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
