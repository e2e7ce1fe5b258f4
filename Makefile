# Two commands for a new user: `make demo` and `make test`. Both build .venv from scratch when missing.
# `make test` (the CI entry) runs both test tiers; `make test-fast` only tests/unit (in process, under a minute).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q tests

test-fast: $(STAMP)
	$(VPY) -m pytest -q tests/unit

demo: $(STAMP)
	$(VPY) tools/demo.py

clean:
	rm -rf $(VENV) runs .pytest_cache
