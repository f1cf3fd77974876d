# `make run` and `make test` set up everything they need on a fresh Debian machine.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: run test setup debs clean

# Debian packages: libcap-dev to build python-prctl, libseccomp2 for pyseccomp.
# Installed only when we are root and they are missing; otherwise we say what to run.
debs:
	@missing=""; \
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
