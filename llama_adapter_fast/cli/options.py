"""Options and argument types that several commands share."""

from __future__ import annotations

import argparse

from llama_adapter_fast.models.quantized import QUANTIZATIONS
from llama_adapter_fast.ops import BACKENDS


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None,
                   help="the base's tokenizer: a sentencepiece tokenizer.model, a Hugging Face tokenizer.json, or a "
                        "folder with one (default: the base folder's, else the bundled one)")
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS,
                   help="gated attention backend: auto = Triton kernels on CUDA, sdpa otherwise")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the base weights (default: the checkpoint's dtype)")


def add_quantize_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default=None, choices=QUANTIZATIONS,
                   help="the frozen base's linear layers in 4 bits (nf4, fp4) or 8 bits (int8) by bitsandbytes, or "
                        "int8 weight-only by torchao; embeddings, norms and the adapter stay in the compute dtype "
                        "(--dtype)")


def int_at_least(low: int):
    """An argparse type: an int >= low (argparse names the option when it is not)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse's message for a non-number: "invalid int value"
    return parse


def layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def add_image_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-modal adapter", "image-conditioned prompts (records with an \"image\" key)")
    g.add_argument("--image-encoder", default=None,
                   help="Hugging Face CLIP folder (CLIPVisionModel[WithProjection] or CLIPModel): turns it on")
    g.add_argument("--image-layers", type=layer_list, default=None,
                   help="encoder layers whose [CLS] features are concatenated (default: 4 evenly spaced, e.g. "
                        "3,6,9,12 of 12)")
    g.add_argument("--projection-hidden", type=int, default=None, help="hidden width of the image projection "
                                                                       "(default: the model width)")
    g.add_argument("--image-fusion", default="all", choices=["all", "early"],
                   help="which adapted layers add the image to their prompts: all, or early (LLaMA-Adapter V2: the "
                        "lowest --early-layers, the layers above keep plain prompts)")
    g.add_argument("--early-layers", type=int, default=None,
                   help="with --image-fusion early: adapted layers, from the bottom, that take the image (default: "
                        "the lower half)")
    g.add_argument("--feature-cache", default=None, help="folder of cached encoder features (default: "
                                                         "OUT/image_features)")
