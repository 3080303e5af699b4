# Two commands for a fresh machine: `make demo` runs the default study, `make test` runs the tests.
# Both create the virtual environment first (Python ≥ 3.11; torch pinned to the CPU build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
# Where pip finds a CPU build of torch if the default index would give a CUDA one, e.g.
# `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
PIP_TORCH := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# Rules call the `sciquant` command: the environment's bin folder goes first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test venv system-packages lint dryrun clean

demo: venv
	$(BIN)/snakemake --cores $(CORES)

test: venv system-packages
	PYTHON_BIN=$(BIN)/python scripts/run-tests.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing later can pull a CUDA build.
	$(BIN)/python -m pip install $(PIP_TORCH) "torch==2.13.0"
	$(BIN)/python -m pip install $(PIP_TORCH) -e ".[dev]"
	touch $@

# Debian packages the tests use: a real Slurm (slurmctld, slurmd, slurmdbd, munge, mariadb) and
# Chromium (the report is checked in a headless browser). Needs root; without it those tests are
# skipped and say why.
system-packages:
	@if [ "$$(id -u)" = 0 ]; then scripts/install-slurm.sh && scripts/install-chromium.sh; \
	else echo "not root: skipping Debian packages (Slurm and browser tests will be skipped)"; fi

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

dryrun: venv
	$(BIN)/snakemake -n

clean:
	rm -rf results logs benchmarks .snakemake
