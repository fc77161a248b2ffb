# Two commands for a newcomer: `make run` and `make test`. Both set up .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
IMPORTCHECK := build/importcheck

.PHONY: run test test-all lint imports docs setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the local CPU build; anything else would pull CUDA wheels.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,docs]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/pyro-lag fit

# The gates: lint over the whole tree, types of the library, the import contract, doctests,
# the tests, and the docs with warnings as errors.
test: lint imports docs
	$(BIN)/python -m pytest -q --doctest-modules pyro_lag models cli
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy pyro_lag

# The layering contract in pyproject.toml, checked on the package as installed
# (models/ and cli/ become pyro_lag.models and pyro_lag.cli only there).
imports: $(STAMP)
	rm -rf $(IMPORTCHECK)
	$(BIN)/python -m pip install --quiet --no-deps --target $(IMPORTCHECK) .
	cd $(IMPORTCHECK) && PYTHONPATH=. $(CURDIR)/$(BIN)/lint-imports $(CURDIR)/pyproject.toml

docs: $(STAMP)
	$(BIN)/sphinx-build -E -q -W --keep-going -b html docs docs/_build/html

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

clean:
	rm -rf $(VENV) runs build docs/_build
