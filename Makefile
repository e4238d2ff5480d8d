# Two commands do everything on a fresh machine:
#   make study   build the environment if needed, then run the whole study
#   make test    build the environment if needed, then run the tests
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.chexlib-ready
SPEC    ?= papermill_runs/demo.yaml
PYTEST_ARGS ?=

.PHONY: venv study test bench lint lab clean-outputs

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt tools/setup_env.sh
	bash tools/setup_env.sh $(VENV)
	touch $(STAMP)

study: venv
	$(VENV)/bin/chexlib study $(SPEC)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks measure speed and print ratios measured side by side in one run.
bench: venv
	bash tools/bench.sh

lint: venv
	$(VENV)/bin/ruff check chexlib tests
	$(VENV)/bin/ruff format --check chexlib tests

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

clean-outputs:
	find outputs -mindepth 1 ! -name README.md -exec rm -rf {} +
