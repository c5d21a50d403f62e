# The commands the README promises: `make test`, `make demo` and `make image`.
# Each installs what it needs (idempotently) before running.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-kernels demo image setup system-deps clean-testbed

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

# The image the committed manifests name, in podman's storage, plus an OCI
# archive in build/ for nodes without a registry. Cached: a no-op when nothing
# it is built from changed.
image: setup
	scripts/build-image.sh "$$($(PY) -c 'from merbridge_py.manifests import DEFAULT_IMAGE; print(DEFAULT_IMAGE)')"

# The container test (tests/test_container.py) runs the image: build it first.
test: setup image
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# Debian's 6.1, two 6.12s and (as the expected refusal) 5.10, each booted under
# QEMU's software emulation running the kernel tests (merbridge_py/kernels,
# docs/kernels.md). Kernel packages are cached in ~/.cache/merbridge-py/kernels.
test-kernels: setup
	$(VENV)/bin/merbridge-py test-kernels $(KERNELS_ARGS)

demo: setup
	$(VENV)/bin/merbridge-py bench --quick

clean-testbed: setup
	$(VENV)/bin/merbridge-py testbed down --all
