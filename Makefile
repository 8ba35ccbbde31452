# make run   installs into .venv and starts the service in dev mode on http://127.0.0.1:8080 (SQLite, no outside services)
# make test  installs into .venv (with the test extras) and runs the whole test suite
# make lint  ruff and mypy (strict on cds_service/pipeline), as CI runs them before the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-test run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[postgres]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,postgres]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/cds-service serve --dev

test: install-test
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check cds_service tests bench
	$(BIN)/mypy

bench: install-test
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# axe-core (npm) for the accessibility tests, pinned by tests/a11y/package-lock.json. Without npm, or offline,
# those tests skip (CI installs it itself and fails without it).
A11Y := tests/a11y
.PHONY: install-a11y
test: install-a11y
install-a11y:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory $(A11Y)/node_modules/.installed \
	  || echo "npm ci failed: the accessibility tests will skip"; \
	else echo "npm not found: the accessibility tests will skip"; fi
$(A11Y)/node_modules/.installed: $(A11Y)/package.json $(A11Y)/package-lock.json
	cd $(A11Y) && npm ci --no-audit --no-fund --silent
	touch $@
