# Two commands do all set-up: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: demo test bench venv clean gpu-check browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first: a plain `torch` requirement could pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray]'  # ray: the grid's Ray backend is tested too
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m latentlm.demo

# tests/test_report.py renders the report in headless Chromium; this installs Debian's chromium
# when missing (root + apt), and the test itself tries the same script, else skips with the reason.
browser:
	-bash scripts/ensure_chromium.sh

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# On a GPU machine: CUDA-marked tests + a short PTB VAE training and evaluation on the GPU.
# Uses the machine's preinstalled CUDA torch, not .venv's CPU build (see scripts/gpu_check.sh).
gpu-check:
	bash scripts/gpu_check.sh

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'

clean:
	rm -rf $(VENV) runs
