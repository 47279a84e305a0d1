"""The `llama-adapter-fast` command: finetune, generate, pretrain (a small base) and demo.

    llama-adapter-fast finetune --base BASE_DIR --data alpaca.json --out runs/adapter
    llama-adapter-fast generate --base BASE_DIR --adapter runs/adapter/adapter.safetensors \\
        --prompt "Give the opposite of the word." --input wet
    llama-adapter-fast demo     # everything on a tiny model and the bundled data, CPU-sized
    llama-adapter-fast demo-mm  # the multi-modal adapter: questions about pictures

Several GPUs or machines: torchrun --nproc_per_node 8 -m llama_adapter_fast.cli finetune ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

BACKENDS = ("auto", "triton", "sdpa", "eager")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece tokenizer.model (default: the base folder's, else the bundled one)")
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS,
                   help="gated attention backend: auto = Triton kernels on CUDA, sdpa otherwise")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the base weights (default: the checkpoint's dtype)")


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="train an adapter on Alpaca-format instructions (base frozen)",
                       description="Train the adaption prompts and gates of LLaMA-Adapter; the base stays frozen. "
                                   "Writes adapter.safetensors, checkpoint.pt, metrics.jsonl and loss.png.")
    p.add_argument("--base", required=True, help="base model: Hugging Face folder or Meta folder (params.json)")
    p.add_argument("--data", required=True, help="Alpaca JSON list or JSON Lines (instruction, input, output)")
    p.add_argument("--out", dest="out_dir", default="runs/adapter", help="output folder")
    _add_model_options(p)
    d = dataclasses.fields
    defaults = {f.name: f.default for f in d(_train_config())}
    p.add_argument("--adapter-len", type=int, default=defaults["adapter_len"], help="prompt vectors per layer")
    p.add_argument("--adapter-layers", type=int, default=None, help="top layers with an adapter (default min(30, n))")
    p.add_argument("--gate-activation", default="tanh", choices=["tanh", "identity"])
    p.add_argument("--scalar-gate", action="store_true", help="one gate per layer instead of one per head")
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
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="with torchrun: replicate or shard")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    _add_image_training_options(p)


def _int_at_least(low: int):
    """An argparse type: an int >= low (argparse names the option when it is not)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse's message for a non-number: "invalid int value"
    return parse


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def _add_image_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-modal adapter", "image-conditioned prompts (records with an \"image\" key)")
    g.add_argument("--image-encoder", default=None,
                   help="Hugging Face CLIP folder (CLIPVisionModel[WithProjection] or CLIPModel): turns it on")
    g.add_argument("--image-layers", type=_layer_list, default=None,
                   help="encoder layers whose [CLS] features are concatenated (default: 4 evenly spaced, e.g. "
                        "3,6,9,12 of 12)")
    g.add_argument("--projection-hidden", type=int, default=None, help="hidden width of the image projection "
                                                                       "(default: the model width)")
    g.add_argument("--feature-cache", default=None, help="folder of cached encoder features (default: "
                                                         "OUT/image_features)")


def _train_config():
    from llama_adapter_fast.train import TrainConfig

    return TrainConfig


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer instructions with a base model and an adapter",
                       description="Answer one instruction (--prompt) or a file of them (--instructions).")
    p.add_argument("--base", required=True, help="base model: Hugging Face folder or Meta folder")
    p.add_argument("--adapter", default=None, help="adapter.safetensors (or .pth); without it, the base alone")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="an instruction (or, with --raw, the whole prompt)")
    src.add_argument("--instructions", help="Alpaca JSON / JSON Lines file; 'output' is shown as expected")
    p.add_argument("--input", default="", help="the instruction's input (with --prompt)")
    p.add_argument("--raw", action="store_true", help="no Alpaca template: the text is the prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default=None, help="also write the answers as JSON Lines, each as it comes")
    p.add_argument("--adapter-len", type=int, default=None,
                   help="for an original LLaMA-Adapter .pth, which does not record it (default: from its gates)")
    p.add_argument("--adapter-layers", type=int, default=None, help="likewise (default: from its gates)")
    p.add_argument("--gate-activation", default=None, choices=["tanh", "identity"],
                   help="likewise (default: tanh, as the original fine-tuning code)")
    p.add_argument("--image", default=None, help="a picture for --prompt (a multi-modal adapter)")
    p.add_argument("--image-encoder", default=None,
                   help="CLIP folder of a multi-modal adapter (default: the one it recorded)")
    _add_model_options(p)


def _pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="train a small LLaMA from scratch on text (demo bases)",
                       description="Train every weight of a small LLaMA on a text file (JSON Lines of {'text'} or "
                                   "one document per line) and save it as a Hugging Face folder.")
    p.add_argument("--data", required=True)
    p.add_argument("--out", dest="out_dir", default="runs/base")
    p.add_argument("--tokenizer", default=None, help="default: the bundled tokenizer")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=128, help="the model's context length")
    p.add_argument("--block-len", type=int, default=64, help="tokens per training sequence (documents are packed)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--print-every", type=int, default=0)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="pretrain a tiny base, fine-tune its adapter, answer held-out instructions",
                       description="The whole story on a laptop CPU in about two minutes.")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--base", default=None, help="skip pretraining: use this base folder")
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default=None)
    p.add_argument("--pretrain-steps", type=_int_at_least(1), default=None)
    p.add_argument("--finetune-steps", type=_int_at_least(1), default=None)
    p.add_argument("--show", type=int, default=12, help="held-out answers to print")


def _demo_mm_parser(sub) -> None:
    p = sub.add_parser("demo-mm", help="the multi-modal adapter: fine-tune on pictures, answer held-out pictures",
                       description="Reuse or pretrain the tiny LLaMA of `demo`, pre-train a tiny CLIP vision tower, "
                                   "fine-tune prompts, gates and image projection on questions about pictures, then "
                                   "answer questions about held-out pictures with and without them.")
    p.add_argument("--out", default="runs/demo-mm", help="output folder")
    p.add_argument("--base", default=None, help="use this base folder (default: runs/demo/base if present)")
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default=None)
    p.add_argument("--pretrain-steps", type=_int_at_least(1), default=None)
    p.add_argument("--encoder-steps", type=_int_at_least(0), default=None, help="contrastive steps of the image tower "
                                                                   "(0: keep it random)")
    p.add_argument("--finetune-steps", type=_int_at_least(1), default=None)
    p.add_argument("--show", type=int, default=12, help="held-out answers to print")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the matrices are tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tower's and the adapter's initialization")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-adapter-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _finetune_parser(sub)
    _generate_parser(sub)
    _pretrain_parser(sub)
    _demo_parser(sub)
    _demo_mm_parser(sub)
    return parser


# ----------------------------------------------------------------------------------------


def cmd_finetune(a: argparse.Namespace) -> int:
    from llama_adapter_fast.train import TrainConfig, finetune

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(a).items() if k in fields})
    result = finetune(cfg)
    if result.adapter_path is not None:
        print(f"adapter: {result.adapter_path}")
        if result.history:
            print(f"loss {result.first_loss:.4f} -> {result.final_loss:.4f} in {result.steps} steps, "
                  f"{result.seconds:.1f} s, {result.tokens_per_s:,.0f} tokens/s")
        else:
            print(f"nothing to train: the checkpoint is at step {result.steps}, the last of this run")
        if result.plot_path:
            print(f"loss plot: {result.plot_path}")
    return 0


def load_for_generation(base: str, adapter: str | None, *, attention_backend: str = "auto", device=None,
                        dtype: str | None = None, adapter_settings: dict | None = None,
                        image_encoder: str | None = None):
    """A base model with the adapter of `adapter` (its config read from the file, or from
    `adapter_settings` where the file does not record it), on `device`; a
    MultiModalLLaMAAdapter when the file is a multi-modal adapter."""
    from llama_adapter_fast.model import is_original_adapter, read_adapter_config
    from llama_adapter_fast.multimodal import load_image_adapter, read_image_adapter_record
    from llama_adapter_fast.train import DTYPES, check_attention_dtype, load_base, resolve_device

    dev = resolve_device(device)
    if dtype is not None:
        check_attention_dtype(attention_backend, dev, DTYPES[dtype], f"--dtype {dtype}")
    kwargs = {"attention_backend": attention_backend}
    if adapter is not None:
        settings = read_adapter_config(adapter, **(adapter_settings or {}))
        kwargs.update(settings)
        if is_original_adapter(adapter):
            print(f"adapter: {adapter} is an original LLaMA-Adapter file, read with adapter_len "
                  f"{settings['adapter_len']} and adapter_layers {settings['adapter_layers']} and gate activation "
                  f"{settings['gate_activation']} (--adapter-len, --adapter-layers and --gate-activation set them)")
    else:
        kwargs["adapter_layers"] = 0
    model = load_base(base, device=dev, dtype=DTYPES[dtype] if dtype else None, **kwargs)
    weights = model.tok_embeddings.weight.dtype
    check_attention_dtype(attention_backend, dev, weights, f"a {str(weights).removeprefix('torch.')} base (--dtype)")
    if image_encoder is not None or (adapter is not None and read_image_adapter_record(adapter) is not None):
        if adapter is None:
            raise ValueError("image-encoder: needs a multi-modal --adapter")
        return load_image_adapter(model, adapter, image_encoder=image_encoder, device=dev).eval()
    if adapter is not None:
        model.load_adapter(adapter)
    return model.eval()


def _check_generate_options(a: argparse.Namespace) -> None:
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    if not 0 <= a.temperature < float("inf"):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {a.temperature}")
    if not 0 < a.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {a.top_p}")


def _open_output(path: str):
    """The --output file, opened for appending (so that an existing file stays as it is until
    the model has loaded), or a ValueError naming it: checked before anything loads."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--output {path}: cannot write there ({exc.strerror or exc})") from None


def cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from llama_adapter_fast.data import load_instructions
    from llama_adapter_fast.generate import iter_answers, prompt_ids
    from llama_adapter_fast.train import base_format, load_tokenizer

    _check_generate_options(a)
    base_format(a.base)
    tokenizer = load_tokenizer(a.tokenizer, a.base)
    if a.instructions:
        records = load_instructions(a.instructions, require_output=False)
    else:
        records = [{"instruction": a.prompt, "input": a.input, "output": ""}]
    output = _open_output(a.output) if a.output else None
    try:
        settings = {"adapter_len": a.adapter_len, "adapter_layers": a.adapter_layers,
                    "gate_activation": a.gate_activation}
        model = load_for_generation(a.base, a.adapter, attention_backend=a.attention_backend, device=a.device,
                                    dtype=a.dtype, adapter_settings=settings, image_encoder=a.image_encoder)
        _attach_images(a, records, model)
        # A multi-modal adapter answers through its LLaMA with one prompt offset per record.
        offset = model.answer_offsets(records) if hasattr(model, "image_encoder") else None
        llama = model.llama if hasattr(model, "image_encoder") else model
        context = llama.args.max_seq_len
        n_prompt = len(prompt_ids(tokenizer, records[0], not a.raw))
        if not a.instructions and n_prompt >= context:
            raise ValueError(f"--prompt: its prompt of {n_prompt} tokens leaves no room in the model's context of "
                             f"{context}")
        if output is not None:
            output.truncate(0)
        generator = torch.Generator().manual_seed(a.seed)
        answers = iter_answers(llama, tokenizer, records, max_new_tokens=a.max_new_tokens,
                               temperature=a.temperature, top_p=a.top_p, batch_size=a.batch_size,
                               template=not a.raw, generator=generator, skip_too_long=True, prompt_offset=offset)
        for i, text in answers:
            record = records[i]
            if text is None:
                n = len(prompt_ids(tokenizer, record, not a.raw))
                reason = f"its prompt of {n} tokens leaves no room in the model's context of {context}"
                print(f"llama-adapter-fast generate: warning: {a.instructions}: record {i}: {reason}: skipped",
                      file=sys.stderr)
                row = {**record, "response": None, "skipped": reason}
            else:
                print(f"### Instruction: {record['instruction']}")
                if record.get("image"):
                    print(f"### Image: {record['image']}")
                if record.get("input"):
                    print(f"### Input: {record['input']}")
                print(f"### Response: {text}")
                if record.get("output"):
                    mark = "correct" if text.strip() == record["output"].strip() else "expected"
                    print(f"    ({mark}: {record['output']})")
                print(flush=True)
                row = {**record, "response": text}
            if output is not None:  # each answer is safe on disk as soon as it exists
                output.write(json.dumps(row) + "\n")
                output.flush()
    finally:
        if output is not None:
            output.close()
    if a.output:
        print(f"answers written to {a.output}")
    return 0


def _attach_images(a: argparse.Namespace, records: list[dict], model) -> None:
    """--image goes with --prompt; images of --instructions records are relative to that file.
    Either needs a multi-modal adapter."""
    from llama_adapter_fast.vision import ImageError, load_image

    if a.image is not None:
        if a.instructions:
            raise ValueError("image: give the pictures of --instructions in their records' \"image\" keys")
        records[0]["image"] = a.image
    elif a.instructions:
        for record in records:
            if record.get("image"):
                record["image"] = str(Path(a.instructions).parent / record["image"])
    with_image = [i for i, r in enumerate(records) if r.get("image")]
    for i in with_image:
        where = "image" if a.image is not None else f"{a.instructions}: record {i}"
        if not hasattr(model, "image_encoder"):
            raise ValueError(f"{where}: pictures need a multi-modal adapter (trained with --image-encoder)")
        try:
            load_image(records[i]["image"])  # a bad picture stops here, named with its record
        except ImageError as exc:
            raise ImageError(f"{where}: {exc}") from exc


def cmd_pretrain(a: argparse.Namespace) -> int:
    from llama_adapter_fast.model import ModelArgs
    from llama_adapter_fast.tokenizer import Tokenizer
    from llama_adapter_fast.train import TrainConfig, pretrain

    tokenizer = Tokenizer(a.tokenizer)
    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                     vocab_size=tokenizer.n_words, multiple_of=32, max_seq_len=a.max_seq_len, adapter_layers=0)
    if a.block_len > a.max_seq_len:
        raise ValueError(f"--block-len ({a.block_len}) must not exceed --max-seq-len ({a.max_seq_len})")
    cfg = TrainConfig(out_dir=a.out_dir, max_seq_len=a.block_len, batch_size=a.batch_size, max_steps=a.max_steps,
                      lr=a.lr, weight_decay=0.1, warmup_steps=max(1, a.max_steps // 20), seed=a.seed,
                      device=a.device, overwrite=True, print_every=a.print_every, save_every=a.max_steps)
    _, result = pretrain(cfg, args, a.data, tokenizer=tokenizer)
    print(f"base model: {a.out_dir} (loss {result.first_loss:.3f} -> {result.final_loss:.3f}, {result.seconds:.0f} s)")
    return 0


# ----------------------------------------------------------------------------------------
# The demo

DEMO_MODEL = dict(dim=128, n_layers=4, n_heads=4, multiple_of=32, max_seq_len=128)
# Sized for two CPU cores: about 80 s of pretraining (800 steps of 16 packed blocks of 64
# tokens) and 20 s of adapter fine-tuning.
DEMO_PRETRAIN = dict(batch_size=16, max_steps=800, lr=5e-3, weight_decay=0.1, warmup_steps=40, max_seq_len=64)
DEMO_FINETUNE = dict(batch_size=16, max_steps=200, lr=1e-1, weight_decay=0.02, warmup_steps=20, max_seq_len=128,
                     adapter_len=10)


def _score(answers: list[str], records: list[dict]) -> int:
    return sum(a.strip() == r["output"].strip() for a, r in zip(answers, records, strict=True))


def cmd_demo(a: argparse.Namespace) -> int:

    from llama_adapter_fast.data import SYNTHETIC_FILES, load_instructions
    from llama_adapter_fast.generate import answer
    from llama_adapter_fast.model import LLaMAAdapter, ModelArgs
    from llama_adapter_fast.tokenizer import Tokenizer
    from llama_adapter_fast.train import TrainConfig, finetune, load_base, pretrain, resolve_device

    t0 = time.perf_counter()
    out = Path(a.out)
    device = resolve_device(a.device)
    backend = a.attention_backend
    shown = "triton" if backend == "auto" and device.type == "cuda" else ("sdpa" if backend == "auto" else backend)
    tokenizer = Tokenizer()
    heldout = load_instructions(SYNTHETIC_FILES["heldout"])
    n_train = len(load_instructions(SYNTHETIC_FILES["train"]))
    print(f"LLaMA-Adapter demo on {device.type.upper()} (gated attention backend: {shown})\n")

    if a.base is None:
        args = ModelArgs(vocab_size=tokenizer.n_words, adapter_layers=0, **DEMO_MODEL)
        n_params = sum(p.numel() for p in LLaMAAdapter(args).parameters())
        steps = a.pretrain_steps or DEMO_PRETRAIN["max_steps"]
        print(f"[1/3] No pretrained LLaMA is bundled, so first a tiny one learns facts from plain sentences\n"
              f"      ({SYNTHETIC_FILES['pretrain'].name}: opposites, capitals, sequences, colours).\n"
              f"      LLaMA dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, {n_params:,} parameters, "
              f"{steps} steps, every weight trained.")
        cfg = TrainConfig(**{**DEMO_PRETRAIN, "max_steps": steps}, out_dir=str(out / "base"), device=str(device),
                          overwrite=True, print_every=max(1, steps // 8), save_every=steps, seed=0)
        _, res = pretrain(cfg, args, SYNTHETIC_FILES["pretrain"], tokenizer=tokenizer)
        print(f"      base saved as a Hugging Face folder: {out / 'base'} ({res.seconds:.0f} s)\n")
        base_dir = out / "base"
    else:
        base_dir = Path(a.base)

    base = load_base(base_dir, device=device, adapter_layers=0, attention_backend=backend).eval()
    before = answer(base, tokenizer, heldout, max_new_tokens=8, batch_size=64)
    n_layers = base.args.n_layers
    del base

    steps = a.finetune_steps or DEMO_FINETUNE["max_steps"]
    model = load_base(base_dir, device=device, adapter_len=DEMO_FINETUNE["adapter_len"], adapter_layers=n_layers,
                      attention_backend=backend)
    print(f"[2/3] Fine-tuning the adapter only: {n_layers} layers x {model.args.adapter_len} prompt vectors + "
          f"per-head gates = {model.num_adapter_parameters():,} trainable parameters, base frozen.\n"
          f"      {n_train} Alpaca-format instructions ({SYNTHETIC_FILES['train'].name}) asking about 3/4 of the "
          f"facts in wordings the base never saw; {steps} steps.")
    cfg = TrainConfig(**{**DEMO_FINETUNE, "max_steps": steps}, data=str(SYNTHETIC_FILES["train"]),
                      out_dir=str(out / "adapter"), attention_backend=backend, device=str(device), overwrite=True,
                      print_every=max(1, steps // 8), save_every=steps, seed=0)
    res = finetune(cfg, model=model, tokenizer=tokenizer)
    print(f"      loss {res.first_loss:.3f} -> {res.final_loss:.3f} ({res.seconds:.0f} s)")
    print(f"      adapter: {res.adapter_path}")
    print(f"      loss plot: {res.plot_path}\n")

    model.eval()
    after = answer(model, tokenizer, heldout, max_new_tokens=8, batch_size=64)
    print(f"[3/3] Held-out instructions: facts the instruction set never asked about "
          f"({SYNTHETIC_FILES['heldout'].name}).")
    print(f"      {'instruction [input]':50s} {'expected':9s} {'base alone':16s} with the adapter")
    step = max(1, len(heldout) // max(1, a.show))
    for i in range(0, len(heldout), step)[: a.show]:
        r = heldout[i]
        text = r["instruction"] + (f" [{r['input']}]" if r["input"] else "")
        mark = "ok" if after[i].strip() == r["output"] else "--"
        base_text = before[i].replace("\n", " ")[:16]
        print(f"      {text[:50]:50s} {r['output']:9s} {base_text:16s} {after[i][:16]:16s} {mark}")
    n_before, n_after = _score(before, heldout), _score(after, heldout)
    print(f"\n      exact answers on {len(heldout)} held-out instructions: base alone {n_before} "
          f"({100 * n_before / len(heldout):.0f}%), with the adapter {n_after} ({100 * n_after / len(heldout):.0f}%)")
    print(f"\nTry one: llama-adapter-fast generate --base {base_dir} --adapter {res.adapter_path} "
          f"--prompt \"Give the opposite of the word.\" --input wet")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_demo_mm(a: argparse.Namespace) -> int:
    from llama_adapter_fast.multimodal_demo import run

    return run(a)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    commands = {"finetune": cmd_finetune, "generate": cmd_generate, "pretrain": cmd_pretrain, "demo": cmd_demo,
                "demo-mm": cmd_demo_mm}
    try:
        return commands[a.command](a)
    except ValueError as exc:
        # Bad input (a malformed data file, a wrong path, a bad option) ends with its message,
        # not a traceback. Set LLAMA_ADAPTER_FAST_DEBUG=1 to see the traceback.
        import os

        if os.environ.get("LLAMA_ADAPTER_FAST_DEBUG"):
            raise
        print(f"llama-adapter-fast {a.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Training has already said where its checkpoint is; the traceback would only bury it.
        print(f"llama-adapter-fast {a.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`generate ... | head`): stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
