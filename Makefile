# mmrest: the two commands of the README, and their building blocks.
# the environment folder: VENV=... or, as for tools/install.sh, MMREST_VENV=...
VENV ?= $(or $(MMREST_VENV),.venv)
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast test-stacks test-stacks-ops bench clean

install:  ## virtual environment with the pinned stack (builds mmcv once, then cached)
	MMREST_VENV="$(abspath $(VENV))" bash tools/install.sh

demo: install  ## train and evaluate RetinaNet-ResT on the built-in synthetic data (the GPU if torch sees one, else the CPU)
	$(PY) tools/demo.py

test: install  ## the whole test suite, slow end-to-end tests included
	$(PY) -m pytest tests

test-fast: install  ## the suite without the tests marked slow
	$(PY) -m pytest tests -m "not slow"

test-stacks:  ## the stack matrix: Python 3.9 + torch 2.1, Python 3.10 + torch 2.4, Python 3.12 + torch 2.10 with the OneDL fork
	bash tools/stacks.sh test classic
	bash tools/stacks.sh test upstream
	bash tools/stacks.sh test onedl

test-stacks-ops:  ## detectors and segmentors on Python 3.9 + torch 2.1 (builds mmcv's ops once, ~20 min)
	bash tools/stacks.sh test classic-ops

bench: install  ## speed, memory and efficiency tables (README "Speed and memory")
	$(PY) tools/analysis/benchmark.py --out work_dirs/benchmark.json

clean:
	rm -rf work_dirs data/synthetic_shapes
