# Two commands for a new user: `make demo` and `make test`. Both build .venv from scratch when missing.
# `make test` (the CI entry) runs the lint (ruff + import contracts) and both test tiers; `make test-fast` only
# tests/unit (in process, under a minute); `make lint` only the lint.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv lint test test-fast demo clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

test: lint
	$(VPY) -m pytest -q tests

test-fast: $(STAMP)
	$(VPY) -m pytest -q tests/unit

demo: $(STAMP)
	$(VPY) tools/demo.py

clean:
	rm -rf $(VENV) runs .pytest_cache
