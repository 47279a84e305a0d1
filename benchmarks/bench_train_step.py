"""End-to-end adapter fine-tuning steps: tokens/s and peak memory of

- thin (triton): this package's LLaMA (``llama_adapter_fast.models.llama``) with the fused kernels;
- thin (sdpa): the same model, same weights, with the two-SDPA backend;
- peft: PEFT's adaption prompt on transformers' LlamaForCausalLM, its default attention;
- mm (triton): the multi-modal adapter (``llama_adapter_fast.models.multimodal``) on the thin
  model: every sample's image feature projected and added to the prompts, so each adapted
  layer's prefix is per sample, (B, Hkv, P, D), and goes to the fused kernels;
- mm (sdpa): the same model and weights with the per-sample prefix through two SDPA calls;
- litgpt: litgpt's LLaMA-Adapter (``litgpt.adapter.GPT``, a LLaMA config) and its own
  attention (two SDPA calls a layer), its ``adapter_kv_cache`` emptied before every step
  (left alone, litgpt's second training step fails: its issue 1287);
- litgpt-fused: the same model and weights after
  ``llama_adapter_fast.integrations.litgpt.enable_fused_adapter`` (backend "auto": the
  fused kernels on a GPU, the two-SDPA backend on a CPU).

Each model is LLaMA-7B shaped (dim 4096, 32 heads, FFN 11008, vocab 32000) with random
weights and a configurable number of layers, the base frozen, the adapter in every layer
(or in the top --adapter-layers). A step is a forward pass, the next-token cross-entropy
in float32, the backward pass and an AdamW step on the adapter parameters (and on the
image projection for the multi-modal rows, whose image features are given, as training
reads them from the feature cache: the frozen encoder runs once per image, not per step).

    python -m benchmarks.bench_train_step                 # 7B-shaped, 8 layers (GPU)
    python -m benchmarks.bench_train_step --preset cpu    # a small model on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VARIANTS = ("thin-triton", "thin-sdpa", "peft", "mm-triton", "mm-sdpa", "litgpt", "litgpt-fused")
NEEDS_GPU = ("thin-triton", "mm-triton")
COLUMNS = (*harness.ENV_COLUMNS, "bench", "impl", "attention", "dtype", "n_layers", "adapter_layers",
           "adapter_len", "dim", "n_heads", "n_kv_heads", "vocab_size", "batch", "seq_len", "steps",
           "step_ms", "step_ms_p20", "step_ms_p80", "tokens_per_s", "images_per_s", "peak_mem_mib", "weights_mib",
           "trainable_params", "loss0", "status", "note")


@dataclass(frozen=True)
class TrainConfig:
    dim: int = 4096
    n_layers: int = 8
    n_heads: int = 32
    n_kv_heads: int = 32
    vocab_size: int = 32000
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    adapter_len: int = 10
    adapter_layers: int | None = None  # None: every layer
    batch: int = 4
    seq_len: int = 2048
    dtype: str = "bf16"
    # The multi-modal rows: global features of 4 layers of a CLIP ViT of this width and depth
    # (ViT-L/14: 1024 and 24), concatenated and projected.
    image_hidden: int = 1024
    image_depth: int = 24

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4 * dim rounded up to multiple_of (11008 for LLaMA-7B)."""
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def n_adapter_layers(self) -> int:
        return self.n_layers if self.adapter_layers is None else self.adapter_layers


PRESETS = {
    # LLaMA-7B's shapes, 8 of its 32 layers, 4 x 2048 tokens a step.
    "7b": TrainConfig(),
    # Small enough for a step or two a second on two CPU cores, with LLaMA's proportions.
    "cpu": TrainConfig(dim=512, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=4096, multiple_of=64,
                       batch=2, seq_len=256, dtype="fp32", image_hidden=768, image_depth=12),
    # A smoke test of every variant, the fused ones under Triton's interpreter on a CPU.
    "tiny": TrainConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, batch=2,
                        seq_len=24, dtype="fp32", image_hidden=64, image_depth=4),
}


class Unavailable(Exception):
    """The variant cannot run here (a missing package, no GPU for the kernels)."""


# ----------------------------------------------------------------------------------------
# Models


@contextlib.contextmanager
def default_device_and_dtype(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on the device in the working dtype: no float32 copy of a
    large model on the host first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@dataclass
class Built:
    forward: Callable[[torch.Tensor], torch.Tensor]  # tokens -> logits
    module: torch.nn.Module
    attention: str  # what computes the attention, for the table
    note: str = ""


def build_thin(cfg: TrainConfig, backend: str, device: torch.device) -> Built:
    try:
        from llama_adapter_fast.models.config import ModelArgs
        from llama_adapter_fast.models.llama import LLaMAAdapter
    except ImportError as exc:
        raise Unavailable(f"llama_adapter_fast.models.llama is not available ({exc})") from None
    if backend == "triton":
        from llama_adapter_fast.ops.custom_ops import TRITON_AVAILABLE, can_run_on

        if not (TRITON_AVAILABLE and can_run_on(device)):
            raise Unavailable("timings of the fused kernels need a GPU")
    args = ModelArgs(
        dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
        vocab_size=cfg.vocab_size, multiple_of=cfg.multiple_of, norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        max_seq_len=cfg.seq_len, adapter_len=cfg.adapter_len, adapter_layers=cfg.n_adapter_layers,
        attention_backend=backend,
    )
    with default_device_and_dtype(device, DTYPES[cfg.dtype]):
        model = LLaMAAdapter(args)
    # The adapter is float32 in the thin model whatever the base dtype (its own choice).
    return Built(model, model, f"gated_prefix_attention({backend})", "adapter parameters float32")


def build_peft(cfg: TrainConfig, device: torch.device) -> Built:
    try:
        from peft import AdaptionPromptConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise Unavailable(f"peft and transformers are needed ({exc.name or exc} is not installed)") from None
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=False,
    )
    with default_device_and_dtype(device, DTYPES[cfg.dtype]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notices between transformers and peft
        model = LlamaForCausalLM(config)
        model = get_peft_model(model, AdaptionPromptConfig(
            adapter_len=cfg.adapter_len, adapter_layers=cfg.n_adapter_layers, task_type="CAUSAL_LM"))
    model.train()
    attn = getattr(model.config, "_attn_implementation", None) or "default"
    return Built(lambda tokens: model(input_ids=tokens).logits, model,
                 f"PEFT adaption prompt, transformers {attn} attention",
                 f"adapter parameters in the model dtype; PEFT {harness.package_version('peft')}")


def build_multimodal(cfg: TrainConfig, backend: str, device: torch.device) -> Built:
    """The thin model inside MultiModalLLaMAAdapter, with fixed image features. The CLIP
    tower is built on the meta device: the step never runs it, only its shape matters."""
    thin = build_thin(cfg, backend, device)
    from llama_adapter_fast.models.multimodal import MultiModalLLaMAAdapter
    from llama_adapter_fast.models.vision import ImageEncoder

    try:
        from transformers import CLIPVisionConfig, CLIPVisionModel
    except ImportError as exc:
        raise Unavailable(f"the image encoder is transformers' CLIPVisionModel ({exc.name} is not installed)") from None
    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=cfg.image_hidden, intermediate_size=4 * cfg.image_hidden, num_hidden_layers=cfg.image_depth,
            num_attention_heads=max(1, cfg.image_hidden // 64), image_size=224, patch_size=14))
    model = MultiModalLLaMAAdapter(thin.module, ImageEncoder(tower))
    g = torch.Generator(device="cpu").manual_seed(1)
    features = torch.randn(cfg.batch, model.image_encoder.feature_dim, generator=g).to(device)
    return Built(lambda tokens: model(tokens, image_features=features), model,
                 f"gated_prefix_attention({backend}), per-sample prefix",
                 f"image features of {model.image_encoder.feature_dim} given; adapter and projection float32")


def build_litgpt(cfg: TrainConfig, fused: bool, device: torch.device) -> Built:
    try:
        import litgpt.adapter as lit_adapter
    except ImportError as exc:
        raise Unavailable(f"litgpt is needed ({exc.name or exc} is not installed)") from None
    config = lit_adapter.Config(
        n_embd=cfg.dim, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_query_groups=cfg.n_kv_heads,
        intermediate_size=cfg.ffn_hidden_dim, vocab_size=cfg.vocab_size, padded_vocab_size=cfg.vocab_size,
        block_size=cfg.seq_len, rotary_percentage=1.0, parallel_residual=False, bias=False,
        norm_class_name="RMSNorm", norm_eps=cfg.norm_eps, mlp_class_name="LLaMAMLP", rope_base=int(cfg.rope_theta),
        adapter_prompt_length=cfg.adapter_len, adapter_start_layer=cfg.n_layers - cfg.n_adapter_layers,
    )
    with default_device_and_dtype(device, DTYPES[cfg.dtype]):
        model = lit_adapter.GPT(config)
    lit_adapter.mark_only_adapter_as_trainable(model)
    version = f"litgpt {harness.package_version('litgpt')}"
    if fused:
        from llama_adapter_fast.integrations.litgpt import enable_fused_adapter

        enable_fused_adapter(model, backend="auto")
        backend = model.transformer.h[-1].attn.fused_backend
        resolved = "triton" if device.type == "cuda" else "sdpa"
        return Built(model, model, f"gated_prefix_attention({backend}: {resolved}) at litgpt's seam", version)
    caches = [m for m in model.modules() if hasattr(m, "adapter_kv_cache")]

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        for m in caches:  # litgpt keeps the first step's prefix (and its freed graph) otherwise
            m.adapter_kv_cache = None
        return model(tokens)

    return Built(forward, model, "litgpt's adapter attention, two SDPA calls",
                 f"{version}; adapter_kv_cache emptied before each step")


def build(variant: str, cfg: TrainConfig, device: torch.device) -> Built:
    if variant == "thin-triton":
        return build_thin(cfg, "triton", device)
    if variant == "thin-sdpa":
        return build_thin(cfg, "sdpa", device)
    if variant == "peft":
        return build_peft(cfg, device)
    if variant in ("mm-triton", "mm-sdpa"):
        return build_multimodal(cfg, variant.removeprefix("mm-"), device)
    if variant in ("litgpt", "litgpt-fused"):
        return build_litgpt(cfg, variant == "litgpt-fused", device)
    raise ValueError(f"unknown variant {variant!r}: expected one of {VARIANTS}")


# ----------------------------------------------------------------------------------------
# Steps


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def make_tokens(cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (cfg.batch, cfg.seq_len), generator=g).to(device)


def run_variant(variant: str, cfg: TrainConfig, device: torch.device, steps: int, warmup: int) -> dict:
    """Build one model, run warm-up steps, then time `steps` steps. Returns the measured fields."""
    torch.manual_seed(0)  # the two thin variants get the same weights, hence the same first loss
    built = build(variant, cfg, device)
    trainable = [p for p in built.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = make_tokens(cfg, device)
    harness.synchronize(device)
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else None

    def step() -> float:
        loss = next_token_loss(built.forward(tokens), tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    loss0 = float(step())  # also the first call: compiles and autotunes the kernels
    for _ in range(max(0, warmup - 1)):
        step()
    harness.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        harness.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    ms, p20, p80 = harness.quantiles(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "attention": built.attention, "note": built.note, "step_ms": ms, "step_ms_p20": p20, "step_ms_p80": p80,
        "tokens_per_s": cfg.batch * cfg.seq_len / (ms * 1e-3), "peak_mem_mib": peak,
        "images_per_s": cfg.batch / (ms * 1e-3) if variant.startswith("mm-") else None,
        "weights_mib": weights / 2**20 if weights is not None else None,
        "trainable_params": sum(p.numel() for p in trainable), "loss0": loss0, "status": "ok",
    }


def compile_variant(cfg: TrainConfig, device: torch.device) -> None:
    """Compile the fused kernels the thin model uses, without running them."""
    built = build_thin(cfg, "triton", device)
    tokens = make_tokens(cfg, device)
    harness.reset_autotuning()
    with harness.compile_only():
        next_token_loss(built.forward(tokens), tokens).backward()
    harness.synchronize(device)


def bench(variants: Sequence[str], cfg: TrainConfig, device: torch.device, steps: int, warmup: int,
          base: dict, deadline: harness.Deadline, csv_path: Path | None = None) -> list[dict]:
    """One row per variant, each written to csv_path as soon as it is measured; a variant
    that fails in any way is recorded with its error and the next one runs."""
    log = harness.RowLog(csv_path, COLUMNS)
    for variant in harness.progress(variants, "train-step variants"):
        row = {**base, "impl": variant, **_config_fields(cfg), "steps": steps}
        if deadline.passed():
            log.write({**row, "status": "skipped", "note": "time budget spent"})
            continue
        try:
            row.update(run_variant(variant, cfg, device, steps, warmup))
        except Unavailable as exc:
            row.update(status="skipped", note=str(exc))
        except Exception as exc:  # out of memory, a failing kernel, anything: recorded, and the next runs
            status = "oom" if harness.is_out_of_memory(exc) else "error"
            row.update(status=status, note=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
        harness.release_memory()
        log.write(row)
        if row["status"] == "ok":
            images = f" ({row['images_per_s']:,.1f} images/s)" if row.get("images_per_s") else ""
            harness.log(f"  {variant}: {row['tokens_per_s']:,.0f} tokens/s{images}, step {row['step_ms']:.1f} ms"
                       + (f", peak {row['peak_mem_mib']:,.0f} MiB" if row["peak_mem_mib"] else "")
                       + f", first loss {row['loss0']:.4f}")
        else:
            harness.log(f"  {variant}: {row['status']}: {row['note']}")
    return log.rows


def _config_fields(cfg: TrainConfig) -> dict:
    fields = asdict(cfg)
    fields["adapter_layers"] = cfg.n_adapter_layers
    return {k: v for k, v in fields.items() if k in COLUMNS}


# ----------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="7b: LLaMA-7B shapes (default with CUDA); cpu: a small model (default without)")
    p.add_argument("--layers", type=int, help="number of layers (the 7B model has 32)")
    p.add_argument("--adapter-layers", type=int, help="layers with an adapter, counted from the top (default: all)")
    p.add_argument("--adapter-len", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=None,
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: all; the triton ones only with "
                        f"CUDA)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles and tunes)")
    p.add_argument("--device", default=None)
    p.add_argument("--csv", type=Path, help="output file (default: benchmarks/results/<device>-<date>-train-step.csv)")
    p.add_argument("--deadline", type=float, help="time.time() after which no new variant starts")
    p.add_argument("--budget-s", type=float, help="seconds after which no new variant starts")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the fused kernels of the thin model without timing anything")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = PRESETS[args.preset]
    overrides = {"n_layers": args.layers, "adapter_layers": args.adapter_layers, "adapter_len": args.adapter_len,
                 "batch": args.batch, "seq_len": args.seq_len, "dtype": args.dtype}
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else harness.default_device()
    args.preset = args.preset or ("7b" if device.type == "cuda" else "cpu")
    cfg = config_from_args(args)
    if args.compile_only:
        compile_variant(cfg, device)
        print(f"compiled the thin model's kernels ({cfg.n_layers} layers, {cfg.batch} x {cfg.seq_len})", flush=True)
        return []
    variants = args.variants or [v for v in VARIANTS if device.type == "cuda" or v not in NEEDS_GPU]
    env = harness.environment(device)
    if device.type != "cuda" and not set(NEEDS_GPU) & set(variants):
        print("Kernel timings need a GPU: the models with the fused kernels are not timed on the CPU.")
    csv_path = args.csv or harness.RESULTS_DIR / f"{harness.run_stem(env)}-train-step.csv"
    deadline = harness.Deadline(args.deadline) if args.deadline else harness.Deadline.after(args.budget_s)
    print(f"train-step benchmark on {harness.format_environment(env)}: {cfg.n_layers} layers of dim {cfg.dim}, "
          f"{cfg.batch} x {cfg.seq_len} tokens, {cfg.dtype}; {', '.join(variants)}")
    rows = bench(variants, cfg, device, args.steps, args.warmup, {**env, "bench": "train_step"}, deadline, csv_path)
    print(f"wrote {csv_path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
