# The two set-up commands of the README: `make demo` runs the main job, `make test` the whole suite.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/gptlab: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

demo: $(BIN)/gptlab
	$(BIN)/gptlab pretrain --overwrite

test: $(BIN)/gptlab
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

lint: $(BIN)/gptlab
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
