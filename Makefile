PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: install test test-all lint run grid bench bench-models bench-install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[test,ray]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

# Fast suite: everything not marked slow, plus ruff.
test: install lint
	$(PY) -m pytest -q -m "not slow"

# Full suite, slow tests included.
test-all: install lint
	$(PY) -m pytest -q

run: install
	$(VENV)/bin/curvinf reproduce --preset quick --out results/quick

# The two paper grids in the background, one job per core at low priority, resuming from
# the committed stores (cheapest work first); logs in results/<preset>/run_stdout.txt,
# progress by `curvinf status results/<preset>`. Hours to days on 2 cores.
GRID_ENV := CURVINF_PROGRESS=0 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
grid: install
	for p in paper paper-code; do mkdir -p results/$$p; \
	  $(GRID_ENV) nohup nice -n 19 $(VENV)/bin/curvinf reproduce --preset $$p \
	    --out results/$$p --no-progress >> results/$$p/run_stdout.txt 2>&1 & \
	done; sleep 2; echo "started: curvinf status results/paper (and results/paper-code)"

# Benchmark environment (.venv-bench): curvinf plus the peers it is timed against.
# The peers and backpack-for-pytorch go in with --no-deps: they declare torchvision,
# whose resolve pulls a CUDA torch (or a torchvision that cannot be imported beside
# the CPU torch 2.13.0); neither imports it on the benchmarked paths.
BVENV := .venv-bench
BPIP := $(BVENV)/bin/python -m pip install -q -c constraints.txt
BENCH_NODEPS := curvlinops-for-pytorch kronfluence backpack-for-pytorch
BENCH_DEPS := linear_operator accelerate einconv einops opt_einsum safetensors tqdm unfoldNd

$(BVENV)/.installed: pyproject.toml constraints.txt
	test -x $(BVENV)/bin/python || $(PYTHON) -m venv $(BVENV)
	$(BPIP) -e .
	$(BPIP) --no-deps $(BENCH_NODEPS)
	$(BPIP) $(BENCH_DEPS)
	$(BVENV)/bin/python -c "import curvlinops, kronfluence.analyzer"
	touch $@

bench-install: $(BVENV)/.installed

# Curvature ladder vs curvlinops and kronfluence (docs/benchmarks.md). ~10 min on 2 cores.
bench: bench-install
	$(BVENV)/bin/python benchmarks/bench_curvature.py $(BENCH_ARGS)

# Exact rungs of an MLP, a CNN and a transformer at equal D (docs/benchmarks.md, issue 12,
# item 5). ~3 min on 2 cores, most of it the transformer's Hessian.
bench-models: install
	$(PY) benchmarks/bench_models.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BVENV) build *.egg-info src/*.egg-info
