# streamrec developer entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench lint clean

$(BIN)/streamrec: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on local disk; an open range would pull a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[fast,test]'
	@touch $@

setup: $(BIN)/streamrec

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m 'not slow' $(PYTEST_ARGS)

demo: setup
	$(BIN)/streamrec demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
