# Two set-up commands: `make demo` and `make test`. Each creates .venv and installs the pinned
# requirements the first time (about 1.5 minutes, 2.6 GB; pip keeps no cache copy), then reuses it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-core test test-slow test-gpu bench bench-kernels bench-data bench-train venv clean

$(STAMP): requirements.txt
	@df -Pk . | awk 'NR == 2 && $$4 < 3500000 { printf "warning: %d MB free here; the venv needs about 2.6 GB (pip stops with \"No space left on device\" below that)\n", $$4 / 1024 }'
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install -q --no-cache-dir -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# the core-operation table (~20 s), then the maze prototype end to end on the small config:
# generate PointMaze data, DP keyframes, D_phi, selector, phase-1, phase-2, baseline, evaluation,
# report (runs/maze/small/report.md with figures)
demo: $(STAMP)
	$(BIN)/python -m interpdiff.demo
	OMP_NUM_THREADS=2 $(BIN)/python -m maze.demo --config configs/maze/small.yaml

demo-core: $(STAMP)
	$(BIN)/python -m interpdiff.demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests

# benchmarks print a table + JSON; kernels and train need a CUDA GPU for real sizes
bench: bench-kernels bench-data bench-train

bench-kernels: $(STAMP)
	$(BIN)/python benchmarks/bench_kernels.py

bench-data: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache
