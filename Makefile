# The two commands a new user needs: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_ROOT ?= runs/quickstart

.PHONY: run test test-slow test-accel fit-table bench papers clean gpu-wheels gpu-check gpu-check-dry-run
SCALE ?= tiny

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m moejax.sweep --config=experiments/quickstart.py --root=$(RUN_ROOT)
	$(PY) -m moejax.report --root=$(RUN_ROOT) --out=$(RUN_ROOT)/report

# Two pytest workers: compilation is single-threaded, so two cores run two tests at once. The 20 slowest tests
# are listed at the end (CI's 10-minute budget: what to mark `slow` next).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=20

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m slow

# The real TPU and H100 compilers on this machine (no accelerator): the kernel-shape grid and the
# train/eval/decode steps (tests/accel_compile_test.py). Its own venv: libtpu and the CUDA plugin
# (about 1.2 GB) stay out of the default one. docs/kernels.md says what it covers.
ACCEL_VENV := .venv-accel
ACCEL_PY := $(ACCEL_VENV)/bin/python
$(ACCEL_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(ACCEL_VENV)
	$(ACCEL_PY) -m pip install --quiet --upgrade pip
	$(ACCEL_PY) -m pip install --quiet -e '.[dev,tpu-compile]'
	$(ACCEL_PY) -m pip install --quiet --no-deps "jax-cuda12-plugin==$$($(ACCEL_PY) -c 'import jax; print(jax.__version__)')" \
	    "jax-cuda12-pjrt==$$($(ACCEL_PY) -c 'import jax; print(jax.__version__)')"
	touch $@

test-accel: $(ACCEL_VENV)/.installed
	$(ACCEL_PY) -m pytest -q -n 2 -m accel_compile tests/accel_compile_test.py

# docs/scaling-out.md "Does it fit": the smallest H100 node count and v5p slice for each published model,
# from the real compilers; compiles are cached in docs/results/fit/fit.json, so a rerun prints the table at once
# and an interrupted search resumes.
PUBLISHED := olmoe_1b_7b qwen1_5_moe_a2_7b deepseekmoe_16b qwen3_30b_a3b mixtral_8x7b
fit-table: $(ACCEL_VENV)/.installed
	$(ACCEL_PY) -m moejax.bench fit $(foreach m,$(PUBLISHED),--config=experiments/published/$(m).py) \
	    --search=gpu:h100 --search=tpu:v5p --set=model.attention=auto --steps --cpu --cpu_devices=32 \
	    --out=docs/results/fit/fit.json

# The paper grids at one scale, then the claims report (docs/reproducing-the-papers.md).
# ROOT=docs/results/tiny/runs OUT=docs/results/tiny BUDGET=10h resumes the shipped tiny runs (finished points are
# skipped) and remakes their report with the power plan beside the verdicts (BUDGET: `claims --budget`).
ROOT ?= runs/papers-$(SCALE)
OUT ?= $(ROOT)/claims
BUDGET ?=
papers: $(VENV)/.installed
	$(PY) -m moejax.sweep --config=experiments/paper_b.py:$(SCALE),all --root=$(ROOT)
	$(PY) -m moejax.sweep --config=experiments/paper_a.py:$(SCALE),all --root=$(ROOT)
	$(PY) -m moejax.claims --root=$(ROOT) --scale=$(SCALE) --out=$(OUT) $(if $(BUDGET),--budget=$(BUDGET))

bench: $(VENV)/.installed
	$(PY) -m moejax.bench step

# The GPU check (docs/performance.md "The GPU check"): fetch the wheels the device image lacks once, here;
# `make gpu-check` is what the device call runs there (OUT is set by the device tool); the dry run runs here on CPU.
gpu-wheels:
	launch/fetch_gpu_wheels.sh .whl

gpu-check:
	launch/gpu_check.sh

gpu-check-dry-run: $(VENV)/.installed
	PYTHON=$(PY) launch/gpu_check.sh --dry-run

clean:
	rm -rf $(VENV) $(ACCEL_VENV) runs build *.egg-info
