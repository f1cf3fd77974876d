# `make run` and `make test` set up everything they need on a fresh Debian machine.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: run test setup debs clean

# Debian packages.  To build the venv: gcc and $(PYTHON)'s headers (python3.X-dev), because
# python-prctl has no wheel and pip always compiles it, against libcap-dev; and, for Debian's own
# Python, python3.X-venv (Debian splits ensurepip out of it, and `python3 -m venv` needs it).  To
# run: libseccomp2, which pyseccomp loads.  What is asked is what the build will use (the compiler
# on PATH, Python.h and ensurepip of $(PYTHON) itself), so a Python of its own (pyenv) needs no
# python3-dev.  Installed when we are root and something is missing; otherwise we stop and say what
# to install.
debs:
	@missing=""; \
	pyver=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') || { \
	  echo "$(PYTHON) does not run: install python3 (Debian: apt-get install python3), or make PYTHON=..." >&2; exit 1; }; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing gcc"; \
	$(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")))' \
	  || missing="$$missing python$$pyver-dev"; \
	$(PYTHON) -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python$$pyver-venv"; \
	for p in libcap-dev libseccomp2; do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "missing Debian packages:$$missing -- run: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml | debs
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# Hosts start with -B (they never write bytecode): compile what they import once, here.
	$(PY) -m compileall -q hosts sandbox reflector/drivers
	touch $(STAMP)

setup: debs $(STAMP)

run: setup
	$(VENV)/bin/drvbox run $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info build
