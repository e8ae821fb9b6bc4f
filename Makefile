# Two entry points (see README): `make demo` and `make test`. Both create .venv if missing and
# install the project into it once; a second run only reinstalls when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where there is no NVIDIA GPU, install the CPU build of torch first, so that the `torch` range of
# pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build. Override freely.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
STAMP := $(VENV)/.kvdiag-installed

.PHONY: demo test install lint clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "no GPU: installing the CPU build $(TORCH_SPEC)"; \
		$(PY) -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvdiag spectrum --model smollm2-135m --out $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n auto

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
