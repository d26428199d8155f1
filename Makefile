# streamrec developer entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup setup-spark lint test test-slow test-all demo clean

$(BIN)/streamrec: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on local disk; an open range would pull a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[fast,test]'
	@touch $@

setup: $(BIN)/streamrec

# The `spark` extra (pyspark, ~430 MB; Java 17 or later on PATH): `refit --engine spark` and its
# slow tests. Not part of `setup`, so `make demo` stays light.
$(VENV)/.spark-installed: $(BIN)/streamrec
	$(BIN)/python -m pip install -q -e '.[fast,test,spark]'
	@touch $@

setup-spark: $(VENV)/.spark-installed

# `make test`: the import-layers contract, then everything but the suites marked slow (model
# quality on MovieLens); CI runs both. Most of the suite waits on processes, brokers and timeouts
# rather than computing, so two pytest-xdist workers (each with its own broker; a test file stays
# in one worker, with its fixtures) halve the time on two cores. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: setup lint
	$(BIN)/python -m pytest -m 'not slow' $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

lint: setup  # the floor plan of docs/architecture.md: imports only go down
	$(BIN)/lint-imports

# pytest exits 5 when nothing is marked slow: not a failure. The slow contracts are independent
# model fits on one torch thread each, so they take one process per core; the other slow suites
# (chaos, replays through the real path, MovieLens quality, Spark, the wheel) wait on processes as
# much as they compute, so they share two workers a file at a time, as `make test` does.
test-slow: setup-spark
	$(BIN)/python -m pytest -m slow -n auto tests/contracts $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -m slow --ignore=tests/contracts $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: test test-slow

demo: setup
	$(BIN)/streamrec demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
