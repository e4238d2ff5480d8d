# Two commands do everything on a fresh machine:
#   make study   build the environment if needed, then run the whole study
#   make test    build the environment if needed, then run the tests
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.chexlib-ready
SPEC    ?= papermill_runs/demo.yaml
STUDY_ARGS ?=
PYTEST_ARGS ?=
CLUSTER_ARGS ?=

.PHONY: venv study publish docs browser-packages cluster-packages cluster cluster-down test bench bench-pipeline bench-train lint lab kernel clean-outputs

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt tools/setup_env.sh
	bash tools/setup_env.sh $(VENV)
	touch $(STAMP)

# The study writes under outputs/ only; `make publish` copies the demo's results
# into the README's results block and docs/results/.
# DATA= (the NIH download; relative to this folder, spaces allowed) and HOSTS=
# ("host1:4,host2:4") reach the spec as {data_env} and {hosts}, like the CHEXLIB_DATA
# and CHEXLIB_HOSTS environment variables. STUDY_ARGS= adds chexlib study flags
# (e.g. STUDY_ARGS="--outputs /scratch/me --log-output").
study: venv
	$(if $(DATA),CHEXLIB_DATA="$(DATA)") $(if $(HOSTS),CHEXLIB_HOSTS="$(HOSTS)") \
	  $(VENV)/bin/chexlib study $(SPEC) $(STUDY_ARGS)

publish: venv
	$(VENV)/bin/chexlib publish-results outputs/demo/summary

# The book: the executed notebooks of docs/walkthrough/ (rendered, never executed) and
# the reference pages of docs/, into site/ (open site/index.html). Works on a fresh
# clone; `make study` then `make publish` refresh what it reads. mkdocs.yml has the contents.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Debian's headless Chromium for tests/test_browser.py (no browser download).
browser-packages:
	bash tools/browser_packages.sh

# A LOCAL EMULATION of a cluster for tests, teaching and measurement: nodes node1..nodeN
# as network namespaces on this machine, each with sshd and slurmd; slurmctld and munge on
# the host (root; Debian's slurm-wlm, munge, openssh-server). CLUSTER_ARGS= adds
# chexlib cluster up flags (e.g. CLUSTER_ARGS="--nodes 2 --cores-per-node 1 --link-rate 1gbit").
cluster-packages:
	bash tools/cluster_packages.sh

cluster: venv cluster-packages
	$(VENV)/bin/chexlib cluster up $(CLUSTER_ARGS)

cluster-down: venv
	$(VENV)/bin/chexlib cluster down

test: venv browser-packages cluster-packages
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks measure speed and print ratios measured side by side in one run.
# `make bench-pipeline` or `make bench-train` for one half.
bench: bench-pipeline bench-train

bench-pipeline: venv
	bash tools/bench.sh

bench-train: venv
	bash tools/bench_train.sh

lint: venv
	$(VENV)/bin/ruff check chexlib tests
	$(VENV)/bin/ruff format --check chexlib tests
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_code_size.py tests/test_layout.py  # sizes, layers, cycles, facades

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

# The chexlib kernel for a JupyterLab or papermill installed outside .venv: a user-wide
# kernel spec (~/.local/share/jupyter/kernels/chexlib) that starts .venv's python, so it
# must be rerun if the checkout moves. Remove it: jupyter kernelspec remove -y chexlib
kernel: venv
	$(PY) -m ipykernel install --user --name chexlib --display-name "Python (chexlib)"

clean-outputs:
	find outputs -mindepth 1 ! -name README.md -exec rm -rf {} +
