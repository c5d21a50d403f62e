# The two commands the README promises: `make test` and `make demo`. Both
# install what they need (idempotently) before running.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo setup system-deps clean-testbed

system-deps:
	@scripts/install-system-deps.sh

# The venv is built from Debian's /usr/bin/python3 with system site packages so it
# sees python3-bpfcc; everything else comes from PyPI.
$(STAMP): setup.cfg pyproject.toml | system-deps
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: system-deps $(STAMP)

test: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/merbridge-py bench --quick

clean-testbed: setup
	$(VENV)/bin/merbridge-py testbed down --all
