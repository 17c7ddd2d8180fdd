# Two entry points for a new user: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup setup-dev data test run clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The serving install: no torch.
setup: $(BIN)/python
	$(BIN)/pip install -q -e .

# Everything: torch (CPU wheel), training, tests.
setup-dev: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

data:
	./scripts/install-data.sh

test: setup-dev data
	$(BIN)/python -m pytest -q

run: setup
	$(BIN)/simserve serve

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
