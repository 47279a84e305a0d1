"""`TrainConfig`: the settings of `finetune` and `pretrain`, with the command line's names,
and which of them a resumed run must keep."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llama_adapter_fast.models.quantized import BACKENDS, QUANTIZATIONS, quantization_problem
from llama_adapter_fast.ops.attention import triton_device_problem, triton_dtype_problem

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
MAX_LR = 1e37  # AdamW's bias correction divides the rate by 1 - beta1 = 0.1 in float32 (max 3.4e38)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Settings of `finetune` (the command line's options, with the same names)."""

    base: str | None = None  # Hugging Face folder (config.json) or Meta folder (params.json)
    data: str | None = None  # Alpaca JSON / JSON Lines
    out_dir: str = "runs/adapter"
    tokenizer: str | None = None  # default: the base folder's tokenizer.model or tokenizer.json, else the bundled one
    template: str | None = None  # "alpaca" or "chat" (default: chat when the tokenizer has a chat template)
    adapter_len: int = 10
    adapter_layers: int | None = None  # default min(30, n_layers)
    gate_activation: str = "tanh"
    scalar_gate: bool = False
    # LLaMA-Adapter V2's tuning of the base (ModelArgs' fields of the same names)
    bias_tuning: list[str] | None = None  # linear layers with a tuned bias (and scale): wq, wk, wv, wo, w1-w3, output
    scale_tuning: str = "output"  # where their scale sits: output, input or none
    norm_tuning: bool = False
    prefix_projection: str = "own"  # "litgpt": the prefix as litgpt's adapters compute it (ModelArgs' field)
    attention_backend: str = "auto"
    max_seq_len: int = 512
    batch_size: int = 4  # records per process and micro-step (padded); with pack, per process and step / grad_accum
    pack: bool = True  # concatenate records without padding (packed attention) instead of right-padding them
    pack_tokens: int | None = None  # tokens per packed micro-batch; default batch_size * max_seq_len
    grad_accum: int = 1
    epochs: float = 5.0
    max_steps: int | None = None  # overrides epochs
    lr: float | None = None  # default blr * global batch / 256, as the original
    blr: float = 9e-3
    min_lr: float = 0.0
    weight_decay: float = 0.02
    warmup_steps: int | None = None  # default 10% of the steps
    clip_grad: float = 1.0  # 0 disables
    precision: str = "auto"  # auto: bf16 (fp16 where bf16 is missing) on a GPU, fp32 on the CPU
    dtype: str | None = None  # cast the base weights (float32, bfloat16, float16)
    quantize: str | None = None  # the frozen linear layers in nf4, fp4, int8 or torchao-int8 (models.quantized)
    activation_checkpointing: bool = False  # recompute each block in the backward instead of keeping its activations
    seed: int = 0
    log_every: int = 1
    print_every: int = 0  # also print a line of metrics every so many steps (0: the progress bar only)
    save_every: int = 100  # steps between checkpoints (and one at the end)
    resume: str | bool = False  # True: out_dir's checkpoint; a path: that checkpoint
    overwrite: bool = False
    strategy: str = "ddp"
    device: str | None = None
    progress: bool = True
    plot: bool = True
    # The multi-modal adapter (llama_adapter_fast.models.multimodal): a CLIP vision folder turns it on.
    image_encoder: str | None = None
    image_layers: list[int] | None = None  # encoder layers whose global features are used (default: 4 evenly spaced)
    projection_hidden: int | None = None  # hidden width of the image projection (default: the model width)
    image_fusion: str = "all"  # "early": the image reaches the lowest --early-layers adapted layers only (V2)
    early_layers: int | None = None  # default: the lower half of the adapted layers
    feature_cache: str | None = None  # encoder features on disk (default: out_dir/image_features)

    def validate(self, world_size: int = 1) -> None:
        """Raise a ValueError naming the option (as the command line spells it) of a setting
        out of range."""
        for name in ("batch_size", "grad_accum", "max_seq_len", "log_every", "save_every", "adapter_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option_name(name)} must be a positive int, got {value!r}")
        if self.pack_tokens is not None and (isinstance(self.pack_tokens, bool) or not isinstance(self.pack_tokens, int)
                                             or self.pack_tokens < 1):
            raise ValueError(f"--pack-tokens must be a positive int, got {self.pack_tokens!r}")
        for name in ("adapter_layers", "warmup_steps", "print_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{option_name(name)} must be an int >= 0, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        for name in ("epochs", "lr", "blr", "min_lr", "weight_decay", "clip_grad"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{option_name(name)} must be a finite number, got {value}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.template not in (None, "alpaca", "chat"):
            raise ValueError(f"--template must be alpaca or chat, got {self.template!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quantize is not None:
            if self.quantize not in QUANTIZATIONS:
                raise ValueError(f"--quantize must be one of {QUANTIZATIONS}, got {self.quantize!r}")
            problem = quantization_problem(self.quantize)
            if problem is not None:
                raise ValueError(f"--quantize {self.quantize} needs {BACKENDS[self.quantize]}: {problem}")
            if self.strategy == "fsdp" and world_size > 1:
                raise ValueError("--quantize cannot be sharded by --strategy fsdp (its 4- and 8-bit weights are not "
                                 "plain tensors): use --strategy ddp, where each process holds the small base")
        for name in ("blr", "weight_decay", "min_lr", "clip_grad"):
            if getattr(self, name) < 0:
                raise ValueError(f"{option_name(name)} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.lr is None and not self.blr > 0:
            raise ValueError(f"--blr must be > 0 (or give --lr), got {self.blr}")
        if self.peak_lr(world_size) > MAX_LR:
            raise ValueError(f"--lr {self.peak_lr(world_size):g} is beyond {MAX_LR:g}: AdamW's first step divides it "
                             f"by 1 - 0.9 in float32, which overflows")
        if self.min_lr > self.peak_lr(world_size):
            peak = f"--lr {self.lr}" if self.lr is not None else \
                f"the learning rate {self.peak_lr(world_size):.3g} (--blr * global batch / 256)"
            raise ValueError(f"--min-lr {self.min_lr} is above {peak}: the schedule decays from the peak to --min-lr")

    def peak_lr(self, world_size: int = 1) -> float:
        """--lr, or by default --blr * global batch / 256 (the original's rule)."""
        if self.lr is not None:
            return self.lr
        return self.blr * self.batch_size * self.grad_accum * world_size / 256


def option_name(field: str) -> str:
    """The command-line option of a TrainConfig field."""
    return "--out" if field == "out_dir" else "--" + field.replace("_", "-")


# Settings a resumed run must keep, and why; every other setting may change and is honoured
# from the resumed step on (the adapter's own settings are compared with the model's).
RESUME_FIXED = {
    "seed": "the data order and the initial prompts follow it",
    "max_seq_len": "the records would be truncated differently",
    "template": "the records were tokenized in this prompt format, which the adapter learns to answer in",
    "image_encoder": "the trained image projection reads this encoder's features",
    "image_layers": "the trained image projection reads these layers' features",
    "projection_hidden": "the trained image projection has this shape",
    "image_fusion": "the trained prompts of each layer were trained with or without the image",
    "early_layers": "the trained prompts of each layer were trained with or without the image",
}
RESUME_UNREPORTED = ("resume", "overwrite", "progress", "plot")


def check_attention_backend(backend: str, device: torch.device, dtype: torch.dtype | None, option: str) -> None:
    """Refuse, before anything loads or trains, --attention-backend triton where the kernels
    cannot run (no CUDA device and no interpreter) or where they cannot compute `dtype`
    correctly (bfloat16 under Triton's interpreter); `option` names what chose the dtype."""
    if backend != "triton":
        return
    problem = triton_device_problem(device)
    if problem is not None:
        raise ValueError(f"--attention-backend triton cannot run on {device}: {problem}; use --attention-backend "
                         f"sdpa or auto there")
    if dtype is None or triton_dtype_problem(device, dtype) is None:
        return
    raise ValueError(f"{option} with --attention-backend triton cannot run on {device}: Triton's interpreter has "
                     f"no {str(dtype).removeprefix('torch.')} arithmetic (the results would be wrong); use "
                     f"--attention-backend sdpa there, or float32")
