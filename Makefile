# Quick start: `make demo` and `make test` on a fresh machine with Python >= 3.11 and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow lint docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/veil demo

# Two worker processes: the suite is mostly single-threaded compilation, so on a 2-core
# machine two workers take ~2/3 of the serial time. Work stealing: a worker that runs out
# takes queued tests from the other, so the slowest tests do not end on one worker alone.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal

# ruff (style, pyflakes, no function-level imports but optional ones) and import-linter (the
# layers in pyproject.toml: imports run one way).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/lint-imports

# The API reference from the docstrings (build/site); strict: a broken reference fails.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
