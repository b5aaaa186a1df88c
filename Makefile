# The two commands a newcomer runs (see README.md).
PY := .venv/bin/python
export PYTHONWARNINGS ?= ignore

.PHONY: setup demo test bench soak
setup:
	bash scripts/setup.sh

# The main job: Marconi on SGLang's real cache classes (scripted workload), then
# a live CPU server (tiny NemotronH, --radix-cache-backend marconi) that the
# frontend examples run against; the server is shut down at the end. Then where
# to go next.
demo: setup
	$(PY) -m sglang_marconi.demo
	$(PY) -m sglang_marconi.cpu_serving.launch --examples examples \
	    --radix-cache-backend marconi --enable-metrics
	@$(PY) -m sglang_marconi.demo --next

test: setup
	$(PY) -m pytest -q tests

# Live soak: the Marconi CPU server under memory pressure, 6 clients and faults
# (docs/live-reliability.md); SOAK=10m for a longer one.
SOAK ?= 60s
soak: setup
	$(PY) -m sglang_marconi.cpu_serving.soak --duration $(SOAK) --clients 6

bench: setup
	$(PY) -m sglang_marconi.bench_bookkeeping
