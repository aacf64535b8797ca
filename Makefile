# Set-up and entry points. `make demo` and `make test` each create the virtual
# environment on first use (and again whenever pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of PyTorch: on these machines `torch==2.13.0` resolves to a CPU wheel
# that lies on disk; a bare `torch` would pull a multi-GB CUDA build. Override on
# other machines, e.g. `make test TORCH_SPEC='torch>=2.5'`. The package itself
# only requires the range torch>=2.5, which an installed torch satisfies.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(PIP) install "$(TORCH_SPEC)" 2>&1 | grep -v '^WARNING: Location' ; \
	  $(BIN)/python -c "import torch" || $(PIP) install "torch>=2.5"
	$(PIP) install -e ".[test]" 2>&1 | grep -v '^WARNING: Location' ; \
	  $(BIN)/python -c "import sparsecc, transformers, onnxruntime, pytest, xdist"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sparsecc demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python tools/bench_capture.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
