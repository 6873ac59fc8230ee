# Two commands on a fresh machine (see README.md):
#   make demo   - the main job: the demo pipeline on a local Ray, exported to ./artifacts/
#   make test   - lint (ruff), types (mypy) and the test suite (pytest) on a real local Ray
# Each creates .venv and installs what it needs by itself.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint typecheck pytest sysdeps clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.core-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test,dev,s3]'
	touch $@ $(VENV)/.core-installed

demo: $(VENV)/.core-installed
	$(PY) -m raysync.demo

# Debian packages the tests use (rsync for the rsync backend); installed when missing.
sysdeps:
	@missing=""; \
	command -v rsync >/dev/null 2>&1 || missing="$$missing rsync"; \
	command -v ssh >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null 2>&1 || missing="$$missing openssh-server"; \
	[ -x /usr/sbin/mkfs.btrfs ] || command -v mkfs.btrfs >/dev/null 2>&1 || missing="$$missing btrfs-progs"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $$missing >/dev/null; \
	  else echo "missing system packages:$$missing (install them; the ssh tests skip without)" >&2; fi; \
	fi

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.test-installed
	$(VENV)/bin/mypy

pytest: $(VENV)/.test-installed sysdeps
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
