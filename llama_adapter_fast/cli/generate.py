"""`llama-adapter-fast generate`: answer instructions with a base model and an adapter."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llama_adapter_fast.cli.options import add_model_options, add_quantize_option

if TYPE_CHECKING:  # the command line imports the package's modules where a command runs
    from llama_adapter_fast.models.formats.native import AdapterSource


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer instructions with a base model and an adapter",
                       description="Answer one instruction (--prompt) or a file of them (--instructions).")
    p.add_argument("--base", required=True, help="base model: Hugging Face folder, Meta folder or GGUF file")
    p.add_argument("--adapter", default=None, help="adapter.safetensors (or .pth); without it, the base alone")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="an instruction (or, with --raw, the whole prompt)")
    src.add_argument("--instructions", help="JSON / JSON Lines file of Alpaca or chat records; 'output' (or a "
                                            "final assistant message) is shown as expected")
    p.add_argument("--input", default="", help="the instruction's input (with --prompt)")
    p.add_argument("--template", default=None, choices=["alpaca", "chat"],
                   help="prompt format (default: the adapter's, else chat when the tokenizer has a chat template)")
    p.add_argument("--raw", action="store_true", help="no template: the text is the prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default=None, help="also write the answers as JSON Lines, each as it comes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--adapter-len", type=int, default=None,
                   help="for an original LLaMA-Adapter .pth, which does not record it (default: from its gates)")
    p.add_argument("--adapter-layers", type=int, default=None, help="likewise (default: from its gates)")
    p.add_argument("--gate-activation", default=None, choices=["tanh", "identity"],
                   help="likewise (default: tanh, as the original fine-tuning code)")
    p.add_argument("--image", default=None, help="a picture for --prompt (a multi-modal adapter)")
    p.add_argument("--image-encoder", default=None,
                   help="CLIP folder of a multi-modal adapter (default: the one it recorded)")
    add_model_options(p)
    add_quantize_option(p)


def load_for_generation(base: str, adapter: str | AdapterSource | None, *, attention_backend: str = "auto", device=None,
                        dtype: str | None = None, quantize: str | None = None, adapter_settings: dict | None = None,
                        image_encoder: str | None = None, pictures: bool = True):
    """A base model (its linear layers quantized by `quantize`, if given) with the adapter of
    `adapter` (its config read from the file, or from `adapter_settings` where the file does
    not record it), on `device`; a
    MultiModalLLaMAAdapter when the file is a multi-modal adapter. Without `pictures` to
    answer about, a multi-modal adapter whose encoder is not at hand answers as the text
    adapter it holds (its prompts and gates; a record without a picture gets exactly that)."""
    from llama_adapter_fast.models.formats.native import adapter_config, read_adapter
    from llama_adapter_fast.models.multimodal import (
        PROJECTION_PREFIX,
        image_encoder_folder,
        load_image_adapter,
        read_image_adapter_record,
    )
    from llama_adapter_fast.training.bases import load_base
    from llama_adapter_fast.training.config import DTYPES, check_attention_backend
    from llama_adapter_fast.training.distributed import resolve_device

    dev = resolve_device(device)
    check_attention_backend(attention_backend, dev, DTYPES[dtype] if dtype is not None else None, f"--dtype {dtype}")
    kwargs = {"attention_backend": attention_backend}
    adapter_file = read_adapter(adapter) if isinstance(adapter, (str, os.PathLike)) else adapter  # read once
    adapter = str(adapter_file.path) if adapter_file is not None else None
    if adapter_file is not None:
        settings = adapter_config(adapter_file, **(adapter_settings or {}))
        kwargs.update(settings)
        if adapter_file.original:
            print(f"adapter: {adapter} is an original LLaMA-Adapter file, read with adapter_len "
                  f"{settings['adapter_len']} and adapter_layers {settings['adapter_layers']} and gate activation "
                  f"{settings['gate_activation']} (--adapter-len, --adapter-layers and --gate-activation set them)")
    else:
        kwargs["adapter_layers"] = 0
    record = read_image_adapter_record(adapter) if adapter is not None else None
    if image_encoder is not None and record is None:
        raise ValueError("--image-encoder: needs a multi-modal --adapter (one trained with --image-encoder)")
    if record is not None and (pictures or image_encoder is not None):
        image_encoder_folder(adapter, image_encoder, record)  # a missing encoder is named before the base loads
    model = load_base(base, device=dev, dtype=DTYPES[dtype] if dtype else None, quantize=quantize, **kwargs)
    weights = model.tok_embeddings.weight.dtype
    check_attention_backend(attention_backend, dev, weights, f"a {str(weights).removeprefix('torch.')} base (--dtype)")
    if record is not None:
        encoder = record.get("source")
        if pictures or image_encoder is not None or (encoder and Path(encoder).is_dir()):
            return load_image_adapter(model, adapter, image_encoder=image_encoder, device=dev).eval()
        print(f"adapter: {adapter} is a multi-modal adapter whose image encoder {encoder} is not here; no record has "
              f"a picture, so it answers as the text adapter it holds (its prompts and gates)", file=sys.stderr)
        model.load_adapter({n: t for n, t in adapter_file.state.items() if not n.startswith(PROJECTION_PREFIX)})
        return model.eval()
    if adapter_file is not None:
        model.load_adapter(adapter_file)
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


def generation_template(a: argparse.Namespace, tokenizer, source: AdapterSource | None = None) -> bool | str:
    """The prompt format to answer in: False with --raw, else --template, the one the adapter
    (`source`, a.adapter read) was trained with, or (the base alone) the tokenizer's default.
    An adapter that recorded its tokenizer refuses another one, and its template refuses a
    different --template."""
    from llama_adapter_fast.training.templates import resolve_template, tokenizer_fingerprint

    if a.raw:
        if a.template is not None:
            raise ValueError("--raw: the text is the prompt as it is, so --template does not apply")
        return False
    recorded = source.metadata if source is not None else {}
    digest = recorded.get("tokenizer_sha256")
    if digest and digest != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"--tokenizer: {tokenizer.path} is not the tokenizer {a.adapter} was trained with (the "
                         f"adapter records a tokenizer of SHA-256 {digest[:16]}...): pass the tokenizer of its "
                         f"training run")
    trained = recorded.get("template")
    if a.template is not None and trained is not None and a.template != trained:
        raise ValueError(f"--template {a.template}: {a.adapter} was trained in the {trained} template, which it "
                         f"answers in (leave --template out)")
    # An adapter file that records no template (an original LLaMA-Adapter .pth) answers in Alpaca's.
    return resolve_template(a.template or trained or ("alpaca" if a.adapter else None), tokenizer)


def _open_output(path: str, overwrite: bool, instructions: str | None):
    """The --output file, opened for appending (so that an existing file, replaced only with
    --overwrite, stays as it is until the model has loaded), or a ValueError naming it:
    checked before anything loads. The instructions file is never written over."""
    if instructions is not None and Path(path).resolve() == Path(instructions).resolve():
        raise ValueError(f"--output {path} is the --instructions file: the answers would write over the questions")
    if Path(path).is_file() and not overwrite:
        raise ValueError(f"--output {path} exists: choose another file, or pass --overwrite to replace it")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--output {path}: cannot write there ({exc.strerror or exc})") from None


def run(a: argparse.Namespace) -> int:
    import torch

    from llama_adapter_fast.generation import iter_answers, prompt_ids
    from llama_adapter_fast.models.formats.native import read_adapter
    from llama_adapter_fast.training.bases import base_format, check_vocabulary, load_tokenizer
    from llama_adapter_fast.training.data import load_instructions

    _check_generate_options(a)
    base_format(a.base)
    tokenizer = load_tokenizer(a.tokenizer, a.base)
    source = read_adapter(a.adapter) if a.adapter else None  # the adapter, read once for all its uses
    template = generation_template(a, tokenizer, source)
    if a.instructions:
        records = load_instructions(a.instructions, require_output=False)
        chat = next((i for i, r in enumerate(records) if "messages" in r), None)
        if chat is not None and template == "alpaca":
            raise ValueError(f"{a.instructions}: record {chat} is a chat record (\"messages\"), which only the chat "
                             f"template can prompt (--template chat, with a tokenizer that has one)")
    else:
        records = [{"instruction": a.prompt, "input": a.input, "output": ""}]
    output = _open_output(a.output, a.overwrite, a.instructions) if a.output else None
    try:
        settings = {"adapter_len": a.adapter_len, "adapter_layers": a.adapter_layers,
                    "gate_activation": a.gate_activation}
        pictures = _pictures(a, records)
        model = load_for_generation(a.base, source, attention_backend=a.attention_backend, device=a.device,
                                    dtype=a.dtype, quantize=a.quantize, adapter_settings=settings,
                                    image_encoder=a.image_encoder, pictures=any(pictures))
        _check_pictures(a, pictures, model)
        # A multi-modal adapter answers through its LLaMA with one prompt offset per record.
        offset = model.answer_offsets(records, images=pictures) if hasattr(model, "image_encoder") else None
        llama = model.llama if hasattr(model, "image_encoder") else model
        check_vocabulary(tokenizer, llama.args.vocab_size)
        context = llama.args.max_seq_len
        n_prompt = len(prompt_ids(tokenizer, records[0], template))
        if not a.instructions and n_prompt >= context:
            raise ValueError(f"--prompt: its prompt of {n_prompt} tokens leaves no room in the model's context of "
                             f"{context}")
        if output is not None:
            output.truncate(0)
        generator = torch.Generator().manual_seed(a.seed)
        answers = iter_answers(llama, tokenizer, records, max_new_tokens=a.max_new_tokens,
                               temperature=a.temperature, top_p=a.top_p, batch_size=a.batch_size,
                               template=template, generator=generator, skip_too_long=True, prompt_offset=offset)
        print(f"template: {template or 'none (--raw)'}")
        for i, text in _warning_answers(answers, a.instructions or "--prompt"):
            record = records[i]
            if text is None:
                n = len(prompt_ids(tokenizer, record, template))
                reason = f"its prompt of {n} tokens leaves no room in the model's context of {context}"
                print(f"llama-adapter-fast generate: warning: {a.instructions}: record {i}: {reason}: skipped",
                      file=sys.stderr)
                row = {**record, "response": None, "skipped": reason}
            else:
                # Labels of no template: the prompt itself is in the template printed above.
                print(f"instruction: {record['instruction']}")
                if record.get("image"):
                    print(f"image: {record['image']}")
                if record.get("input"):
                    print(f"input: {record['input']}")
                print(f"answer: {text}")
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


def _warning_answers(answers, source: str):
    """The answers, each preceded on stderr by the warnings its generation gave (an answer cut
    at the end of the context), as the command's own warning lines."""
    import warnings

    from llama_adapter_fast.generation import ContextLimitWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ContextLimitWarning)
        for i, text in answers:
            for warning in caught:
                print(f"llama-adapter-fast generate: warning: {source}: {warning.message}", file=sys.stderr)
            caught.clear()
            yield i, text


def _pictures(a: argparse.Namespace, records: list[dict]) -> list[str | None]:
    """The picture of each record, as a path to read: --image goes with --prompt; the images
    of --instructions records are relative to that file. The records keep their own values
    (what --output writes back)."""
    if a.image is not None:
        if a.instructions:
            raise ValueError("image: give the pictures of --instructions in their records' \"image\" keys")
        records[0]["image"] = a.image
        return [a.image]
    root = Path(a.instructions).parent if a.instructions else Path(".")
    return [str(root / r["image"]) if r.get("image") else None for r in records]


def _check_pictures(a: argparse.Namespace, pictures: list[str | None], model) -> None:
    """Pictures need a multi-modal adapter; a bad one stops here, named with its record."""
    from llama_adapter_fast.models.vision import ImageError, load_image

    for i, picture in enumerate(pictures):
        if picture is None:
            continue
        where = "image" if a.image is not None else f"{a.instructions}: record {i}"
        if not hasattr(model, "image_encoder"):
            raise ValueError(f"{where}: pictures need a multi-modal adapter (trained with --image-encoder)")
        try:
            load_image(picture)
        except ImageError as exc:
            raise ImageError(f"{where}: {exc}") from exc
