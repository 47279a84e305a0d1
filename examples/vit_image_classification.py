"""LLaMA-Adapter on a tiny ViT: synthetic image classification, on a CPU in a minute or so.

Each image is noise with a square somewhere in it; the class is the quadrant that holds the
square's centre. No checkpoint is downloaded: the first stage trains a tiny ViT on images
with bright squares, standing in for a pretrained checkpoint. The second puts the trained
ViT under a new classification head, freezes it, and `add_llama_adapter` gives its top
layers prompts and zero-initialized gates; only those and the head learn a new task: the
same question about dark squares. At zero gates the adapted model is the frozen ViT, so the
accuracy before fine-tuning is the frozen ViT's with a fresh head.

    python -m examples.vit_image_classification        # from the repository's root
    python -m examples.vit_image_classification --steps 100 --pretrain-steps 200   # quicker

With a real checkpoint, skip the first stage and load the model with
``ViTForImageClassification.from_pretrained(name, num_labels=..., attention_probs_dropout_prob=0.0)``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import ViTConfig, ViTForImageClassification

from examples.common import accuracy, add_options, parse, train
from llama_adapter_fast.integrations.transformers import add_llama_adapter

IMAGE, PATCH, SQUARE, QUADRANTS = 16, 4, 4, 4


def make_images(n: int, generator: torch.Generator, *, dark: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy (3, 16, 16) images with a square of a random colour, brighter (or darker)
    than the background; the labels are the quadrants of the squares' centres (0: top left,
    1: top right, 2: bottom left, 3: bottom right)."""
    corners = torch.randint(0, IMAGE - SQUARE + 1, (n, 2), generator=generator)
    images = torch.randn(n, 3, IMAGE, IMAGE, generator=generator) * 0.5
    colours = (torch.rand(n, 3, generator=generator) + 1.0) * (-1 if dark else 1)
    for image, (top, left), colour in zip(images, corners.tolist(), colours, strict=True):
        image[:, top:top + SQUARE, left:left + SQUARE] += colour[:, None, None]
    lower, right = (corners + SQUARE / 2 >= IMAGE / 2).long().unbind(1)
    return images, lower * 2 + right


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, steps=400, pretrain_steps=600, adapter_layers=3)
    args = parse(parser, argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    config = ViTConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_labels=QUADRANTS, attention_probs_dropout_prob=0.0)

    # Stage 1, a stand-in for a pretrained checkpoint: the whole ViT learns bright squares.
    pretrained = ViTForImageClassification(config).to(device)
    bright, bright_labels = make_images(args.train_size, g, dark=False)
    train(pretrained, {"pixel_values": bright}, bright_labels, steps=args.pretrain_steps,
          batch_size=args.batch_size, lr=2e-3, generator=g, desc="pretraining")
    test_bright, test_bright_labels = make_images(args.test_size, g, dark=False)
    pretrained_accuracy = accuracy(pretrained, {"pixel_values": test_bright}, test_bright_labels)
    print(f"pretrained ViT on bright squares: {pretrained_accuracy:.1%}")

    # Stage 2: the pretrained ViT under a new head; only the adapter and the head learn dark squares.
    model = ViTForImageClassification(config)
    model.vit.load_state_dict(pretrained.vit.state_dict())
    add_llama_adapter(model, adapter_len=args.adapter_len, adapter_layers=args.adapter_layers, train_head=True,
                      backend=args.backend)
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,} "
          f"(prompts and gates of {args.adapter_layers} layers, and the head)")
    dark, dark_labels = make_images(args.train_size, g, dark=True)
    test = make_images(args.test_size, g, dark=True)
    before = accuracy(model, {"pixel_values": test[0]}, test[1])
    print(f"accuracy on dark squares before fine-tuning: {before:.1%}")
    train(model, {"pixel_values": dark}, dark_labels, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
          generator=g, desc="fine-tuning the adapter")
    after = accuracy(model, {"pixel_values": test[0]}, test[1])
    print(f"accuracy on dark squares after fine-tuning:  {after:.1%}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
