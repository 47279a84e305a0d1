"""`llama-adapter-fast finetune`: train an adapter on instruction data, the base frozen."""

from __future__ import annotations

import argparse
import dataclasses

from llama_adapter_fast.cli.options import add_image_training_options, add_model_options, add_quantize_option
from llama_adapter_fast.training.config import TrainConfig


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="train an adapter on instructions or conversations (base frozen)",
                       description="Train the adaption prompts and gates of LLaMA-Adapter; the base stays frozen. "
                                   "Writes adapter.safetensors, checkpoint.pt, metrics.jsonl and loss.png.")
    p.add_argument("--base", required=True,
                   help="base model: Hugging Face folder, Meta folder (params.json) or GGUF file")
    p.add_argument("--data", required=True,
                   help="JSON list or JSON Lines of Alpaca records (instruction, input, output) or chat records "
                        "(messages: role and content)")
    p.add_argument("--template", default=None, choices=["alpaca", "chat"],
                   help="prompt format: the Alpaca prompt, or the tokenizer's chat template with the loss on the "
                        "assistant's turns (default: chat when the tokenizer has a chat template)")
    p.add_argument("--out", dest="out_dir", default="runs/adapter", help="output folder")
    add_model_options(p)
    add_quantize_option(p)

    d = dataclasses.fields
    defaults = {f.name: f.default for f in d(TrainConfig)}
    p.add_argument("--adapter-len", type=int, default=defaults["adapter_len"], help="prompt vectors per layer")
    p.add_argument("--adapter-layers", type=int, default=None, help="top layers with an adapter (default min(30, n))")
    p.add_argument("--gate-activation", default="tanh", choices=["tanh", "identity"])
    p.add_argument("--scalar-gate", action="store_true", help="one gate per layer instead of one per head")
    p.add_argument("--bias-tuning", type=_layer_names, default=None, metavar="LAYERS",
                   help="LLaMA-Adapter V2: comma-separated linear layers (of wq,wk,wv,wo,w1,w2,w3,output) that take "
                        "a zero-initialized bias and scale in every layer; 'all' for every one")
    p.add_argument("--scale-tuning", default=defaults["scale_tuning"], choices=["output", "input", "none"],
                   help="where the tuned scale sits: s * (W x + b) (output, the paper), W (s * x) + b (input, the "
                        "65B release) or no scale (none, the 7B release)")
    p.add_argument("--norm-tuning", action="store_true", help="LLaMA-Adapter V2: the RMSNorm weights train too")
    p.add_argument("--prefix-projection", default="own", choices=["own", "litgpt"],
                   help="prefix keys and values from the layers' own k and v projections (the paper), or as litgpt's "
                        "adapters compute them (to train an adapter litgpt runs)")
    p.add_argument("--max-seq-len", type=int, default=defaults["max_seq_len"])
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                   help="records per process and micro-step (with --pack: per process and step, / --grad-accum)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=defaults["pack"],
                   help="concatenate each step's records without padding into packs of --pack-tokens tokens, "
                        "through the packed attention (default); --no-pack right-pads them")
    p.add_argument("--pack-tokens", type=int, default=None,
                   help="tokens per packed micro-batch (default --batch-size * --max-seq-len)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--epochs", type=float, default=defaults["epochs"])
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default blr * global batch / 256)")
    p.add_argument("--blr", type=float, default=defaults["blr"])
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=defaults["weight_decay"])
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps")
    p.add_argument("--clip-grad", type=float, default=defaults["clip_grad"], help="max gradient norm (0: off)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast: auto = bf16 (or fp16) on a GPU, fp32 on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--print-every", type=int, default=0, help="print a metrics line every N steps")
    p.add_argument("--save-every", type=int, default=defaults["save_every"], help="steps between checkpoints")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the out folder's checkpoint.pt (or the given checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="start again in an out folder that has a checkpoint")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input and recompute the block in the backward: less memory for "
                        "about a third more compute")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="with torchrun: replicate or shard")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    add_image_training_options(p)
    # An option not given parses as NotGiven (holding TrainConfig's default), so that a
    # resumed run can tell it from one given with the default's value.
    p.set_defaults(**{f.name: NotGiven(f.default) for f in dataclasses.fields(TrainConfig)})


class NotGiven:
    """The parsed value of an option the command line did not give; shown as its default."""

    def __init__(self, default: object) -> None:
        self.default = default

    def __str__(self) -> str:
        return str(self.default)


def _layer_names(text: str) -> list[str]:
    from llama_adapter_fast.models.tuning import TUNABLE_LINEARS

    names = list(TUNABLE_LINEARS) if text == "all" else [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in TUNABLE_LINEARS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown linear layers {unknown or [text]}: use names from "
                                         f"{','.join(TUNABLE_LINEARS)}, or 'all'")
    return names


def run(a: argparse.Namespace) -> int:
    from llama_adapter_fast.training.recipes import finetune

    # The options not given (NotGiven) take TrainConfig's defaults, or on resume the
    # checkpoint's settings.
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(a).items() if k in fields and not isinstance(v, NotGiven)}
    result = finetune(TrainConfig(**given), given=set(given))
    if result.adapter_path is not None:
        print(f"adapter: {result.adapter_path}")
        if result.history:
            ran = result.steps - result.resumed_at  # this process's steps, not the checkpoint's too
            resumed = f", resumed at step {result.resumed_at}" if result.resumed_at else ""
            print(f"loss {result.first_loss:.4f} -> {result.final_loss:.4f} in {ran} step{'s' * (ran != 1)}{resumed}, "
                  f"{result.seconds:.1f} s, {result.tokens_per_s:,.0f} tokens/s")
        else:
            print(f"nothing to train: the checkpoint is at step {result.steps}, the last of this run")
        if result.plot_path:
            print(f"loss plot: {result.plot_path}")
    return 0
