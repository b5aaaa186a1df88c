# The two commands a newcomer runs (see README.md).
PY := .venv/bin/python
export PYTHONWARNINGS ?= ignore

.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m sglang_marconi.demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m sglang_marconi.bench_bookkeeping
