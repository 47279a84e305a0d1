"""A pytest plugin that runs litgpt's own adapter tests with the fused backend switched on.

Loaded with ``-p`` by test_litgpt_own_tests.py into a pytest run over litgpt's
tests/test_adapter.py and tests/test_adapter_v2.py (from litgpt's source distribution):
every ``litgpt.adapter.GPT`` and ``litgpt.adapter_v2.GPT`` the tests build is handed to
`enable_fused_adapter` at construction. It also supplies the two fixtures of litgpt's
conftest.py that those tests use (the source distribution ships neither conftest.py nor
its data fixtures) and writes, at the end, the outcome of every test and how many times
each Triton kernel launcher ran to the JSON file named by LITGPT_FUSED_REPORT.
"""

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import litgpt.adapter
import litgpt.adapter_v2

from llama_adapter_fast.bundled import SYNTHETIC_FILES
from llama_adapter_fast.integrations.litgpt import enable_fused_adapter
from llama_adapter_fast.ops.testing import LAUNCH_COUNTS

BACKEND = os.environ.get("LITGPT_FUSED_BACKEND", "triton")
_OUTCOMES: dict[str, str] = {}
FUSED_MODELS = [0]


def _fused_init(init):
    def __init__(self, config, *args, **kwargs):
        init(self, config, *args, **kwargs)
        enable_fused_adapter(self, backend=BACKEND)
        FUSED_MODELS[0] += 1

    return __init__


for _module in (litgpt.adapter, litgpt.adapter_v2):
    _module.GPT.__init__ = _fused_init(_module.GPT.__init__)


@pytest.fixture()
def fake_checkpoint_dir(tmp_path):
    """An empty checkpoint folder of the files litgpt's finetune scripts look for."""
    os.chdir(tmp_path)
    folder = tmp_path / "checkpoints" / "tmp"
    folder.mkdir(parents=True)
    for name in ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).touch()
    return folder


@pytest.fixture()
def alpaca_path(tmp_path):
    """An Alpaca-format JSON file: 24 of the package's bundled synthetic instructions."""
    records = [json.loads(line) for line in SYNTHETIC_FILES["train"].read_text().splitlines()[:24]]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")} for r in records]))
    return path


@pytest.fixture(autouse=True)
def restore_default_dtype():
    torch.set_default_dtype(torch.float32)


_SKIP_REASONS: dict[str, str] = {}


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        previous = _OUTCOMES.get(report.nodeid)
        if previous is None or previous == "passed":
            _OUTCOMES[report.nodeid] = report.outcome
    if report.skipped and isinstance(report.longrepr, tuple):
        _SKIP_REASONS[report.nodeid] = report.longrepr[2]


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LITGPT_FUSED_REPORT")
    if path:
        Path(path).write_text(json.dumps({"outcomes": _OUTCOMES, "skip_reasons": _SKIP_REASONS,
                                          "launches": dict(LAUNCH_COUNTS),
                                          "fused_models": FUSED_MODELS[0], "backend": BACKEND}))
