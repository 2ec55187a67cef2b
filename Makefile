# Graft: `make run` starts the service on its embedded default; `make test` runs every test.
# Both create .venv and install what is missing first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install install-test migrate bench clean

run: install
	$(BIN)/graft serve

test: install-test
	$(BIN)/python -m pytest

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Graft needs Python 3.11; run: make PYTHON=/path/to/python3.11"'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --disable-pip-version-check -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

migrate: install
	$(BIN)/graft migrate

bench: install
	$(BIN)/python bench/e2e.py

clean:
	rm -rf $(VENV) .pytest_cache
