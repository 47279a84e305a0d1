"""What the two examples share: a training loop over tensors held in memory, accuracy, and
the command-line options of both."""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm


def add_options(parser: argparse.ArgumentParser, steps: int, pretrain_steps: int, adapter_layers: int) -> None:
    parser.add_argument("--pretrain-steps", type=int, default=pretrain_steps,
                        help="steps of the first stage, which trains the whole backbone on the pretext task")
    parser.add_argument("--steps", type=int, default=steps, help="fine-tuning steps of the adapter and head")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=4096, help="training examples of each task")
    parser.add_argument("--test-size", type=int, default=1024, help="held-out examples of each task")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate of the adapter and head")
    parser.add_argument("--adapter-len", type=int, default=10, help="prompt tokens per adapted layer")
    parser.add_argument("--adapter-layers", type=int, default=adapter_layers,
                        help="adapted layers, counted from the top")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "sdpa", "eager"),
                        help="the fused op's backend (auto: the Triton kernels on a GPU, SDPA on the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of torch (a model this small runs fastest on one)")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "train_size", "test_size", "adapter_len", "adapter_layers", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.pretrain_steps < 0:
        parser.error("--pretrain-steps must be at least 0")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    torch.set_num_threads(args.threads)
    return args


def train(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *, steps: int,
          batch_size: int, lr: float, generator: torch.Generator, desc: str) -> None:
    """AdamW on the parameters that require grad, over random batches of (inputs, labels)."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    progress = tqdm(range(steps), desc=desc, unit="step")
    for _ in progress:
        index = torch.randint(0, len(labels), (batch_size,), generator=generator)
        batch = {name: t[index].to(device) for name, t in inputs.items()}
        loss = model(**batch, labels=labels[index].to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def accuracy(model: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
             batch_size: int = 256) -> float:
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = {name: t[start:start + batch_size].to(device) for name, t in inputs.items()}
        predicted = model(**batch).logits.argmax(-1).cpu()
        correct += (predicted == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)
