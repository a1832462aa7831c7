# Two set-up commands on a fresh clone: `make demo` (the main job) and `make test`.
# Each creates .venv and installs the project into it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
# torch 2.13.0 is the CPU wheel available on our machines; with a GPU, install the
# CUDA build you want into .venv first (any torch>=2.1 satisfies the project).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test check bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "torch-fidelity==0.4.0"  # the eval extra without torchvision (see pyproject)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m noiserefine.digits.demo --run-dir $(RUN_DIR) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The fast lane for the edit-test loop (< 2 minutes): unit tests only; a test that starts a process or takes
# >= 1 s on an idle 2-core machine is marked `slow` and runs in `make test` only. Two xdist workers of one
# torch thread each: these tests keep one core busy at a time, so on 2 cores the lane took 1:43-1:55 against
# 3:00 serial (2:09-2:17 on 2 workers of 2 threads each; 2026-12-07). `make test` stays serial: its Ray and
# DeepSpeed tests use both cores.
check: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not gpu and not slow" -q -n 2 --dist worksteal $(PYTEST_ARGS)

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
