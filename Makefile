# Set-up and entry points. `make demo` and `make test` work on a fresh Linux machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/fashion_mnist.yaml

.PHONY: setup data demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

data:
	@bash scripts/ensure-fashion-mnist.sh

demo: setup data
	$(VENV)/bin/hiercluster evaluate-checkpoint data/checkpoints/fashion_mnist_resnet20.pt
	$(VENV)/bin/hiercluster run $(CONFIG)

test: setup data
	$(PY) -m pytest -q

bench: setup data
	$(PY) benchmarks/bench_quantize.py
	$(PY) benchmarks/bench_metrics.py
	$(PY) benchmarks/bench_pipeline.py $(CONFIG)
	$(PY) benchmarks/bench_calibrated.py --config $(CONFIG)
	$(PY) benchmarks/bench_many_classes.py

clean:
	rm -rf .pytest_cache .hypothesis build *.egg-info
