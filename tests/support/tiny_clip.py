"""A tiny CLIP vision tower and pictures of shapes, for the tests of the multi-modal adapter
(the model's and the command line's)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=16,
                 patch_size=8)


def tiny_tower(seed: int = 0, **kw):
    """transformers' CLIPVisionModel, small, with CLIP's initialization drawn from `seed`."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return CLIPVisionModel(CLIPVisionConfig(**{**TINY_CLIP, **kw})).eval()
    finally:
        torch.set_rng_state(state)


def tiny_encoder(seed: int = 0, **kw):
    from llama_adapter_fast.models.vision import ImageEncoder

    return ImageEncoder(tiny_tower(seed, **kw), layers=[1, 3])


def write_picture(path: Path, seed: int) -> Path:
    """A picture of shapes as the multi-modal demo draws them."""
    from llama_adapter_fast.cli.demos import shape_pictures

    pixels, _ = shape_pictures.draw(random.Random(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(shape_pictures.png_bytes(pixels))
    return path
