PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: install test test-all lint run bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

# Fast suite: everything not marked slow, plus ruff.
test: install lint
	$(PY) -m pytest -q -m "not slow"

# Full suite, slow tests included.
test-all: install lint
	$(PY) -m pytest -q

run: install
	$(VENV)/bin/curvinf reproduce --preset quick --out results/quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
