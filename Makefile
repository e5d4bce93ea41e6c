# observerd — make run | make test | make test-browser | make smoke | make bench
PYTHON ?= python3
VENV := .venv
# pytest is the only thing the tests need; use the machine's if it has one, else a local venv.
PYTEST := $(shell $(PYTHON) -c "import pytest" 2>/dev/null && echo "$(PYTHON) -m pytest" || echo "$(VENV)/bin/python -m pytest")

.PHONY: run test test-browser smoke bench clean

run:
	$(PYTHON) observerd.py --config lakehouse.toml

# The shipped rules' promtool tests and the end-to-end test over a real Prometheus need Debian's
# prometheus package; without it they are skipped, and this says so in one line.
test: $(if $(findstring $(VENV),$(PYTEST)),$(VENV)/bin/pytest)
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || echo "make test: no promtool/prometheus on PATH: skipping the rules' promtool tests and the real-Prometheus test (apt-get install prometheus)"
	$(PYTEST) -q test_observerd.py

# The browser page in a real headless Chromium (Debian's, installed if missing); its screenshots go to bench/.
test-browser: $(if $(findstring $(VENV),$(PYTEST)),$(VENV)/bin/pytest)
	command -v chromium >/dev/null || { apt-get -o DPkg::Lock::Timeout=600 update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends chromium fonts-dejavu-core; }
	OBSERVERD_BROWSER=1 OBSERVERD_SCREENSHOTS=$(CURDIR)/bench $(PYTEST) -v -rP -k chromium test_observerd.py

$(VENV)/bin/pytest:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check pytest

smoke:
	bash smoke.sh

bench:
	$(PYTHON) bench/bench.py

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ data
