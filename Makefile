# Two commands for a fresh machine: `make demo` trains, `make test` tests. Each creates the local
# virtual environment (.venv) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of PyTorch this project is tested with; override for a CUDA machine, e.g.
# `make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-fast bench clean-venv

# pip also builds data._jpegroi and data._normalize (setup.py; need gcc and libjpeg-dev, else the
# loader decodes whole images, with a warning, and torch normalises).
# constraints.txt pins what decides the demo's bytes and numbers (README: "The demo data").
$(STAMP): pyproject.toml setup.py data/_jpegroi.c data/_normalize.c data/_simd.h constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) cluster/driver.py $(ARGS)

# the whole suite, two workers (each test module on one, in tests/conftest.py's order: slowest
# first), the ten slowest tests listed at the end
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=10 $(ARGS)

# the tests that start no Ray (tests/conftest.py fails one that does), in a couple of minutes
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray" -n 2 --dist loadgroup $(ARGS)

bench: $(STAMP)
	$(PY) bench/tower_parallel.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
