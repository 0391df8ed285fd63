# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv test test-unit demo bench bench-charts cluster-up cluster-down cluster-status lint

$(VENV)/.installed: pyproject.toml requirements.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -r requirements.lock
	@$(PY) -m pip install -q --no-deps -e .
	@touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check ktproxy shadow_image ktwire devtools tests benchmarks

test: venv
	bash tests/run-all.sh

test-unit: venv
	$(PY) -m pytest -q tests/unit

demo: venv
	bash tests/demo.sh

bench: venv
	$(PY) -m benchmarks

# Re-draw benchmarks/results/charts/*.png and the results .md files from the .json files; measures nothing.
bench-charts: venv
	$(PY) -m benchmarks.report --redraw --check

cluster-up:
	bash tests/cluster/up.sh

cluster-down:
	bash tests/cluster/down.sh

cluster-status:
	bash tests/cluster/status.sh
