# observerd — make run | make test | make smoke | make bench
PYTHON ?= python3
VENV := .venv
# pytest is the only thing the tests need; use the machine's if it has one, else a local venv.
PYTEST := $(shell $(PYTHON) -c "import pytest" 2>/dev/null && echo "$(PYTHON) -m pytest" || echo "$(VENV)/bin/python -m pytest")

.PHONY: run test smoke bench clean

run:
	$(PYTHON) observerd.py --config lakehouse.toml

test: $(if $(findstring $(VENV),$(PYTEST)),$(VENV)/bin/pytest)
	$(PYTEST) -q test_observerd.py

$(VENV)/bin/pytest:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check pytest

smoke:
	bash smoke.sh

bench:
	$(PYTHON) bench/bench.py

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ data
