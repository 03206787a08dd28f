# `make test` and `make demo` each set up their own virtual environment from the project's files.
# TORCH_SPEC pins the CPU build of torch that lies on these machines' disk; on a GPU machine use
#   make test TORCH_SPEC=torch
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-out
PRESET ?= full

.PHONY: test demo setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,ray,analysis,federated,world]"
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/flexmore demo --out $(DEMO_OUT) --preset $(PRESET)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
