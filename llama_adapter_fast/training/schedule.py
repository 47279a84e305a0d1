"""The learning-rate schedule (linear warmup, then half a cosine), the data order of each
step (one seeded permutation per epoch, so a resumed run sees what an uninterrupted one
would) and AdamW's parameter groups."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak`, then half a cosine down to `floor` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class Schedule:
    """LambdaLR factor (a class, not a lambda, so that the scheduler's state saves)."""

    def __init__(self, total: int, warmup: int, peak: float, floor: float):
        self.total, self.warmup, self.peak, self.floor = total, warmup, peak, floor

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total, self.warmup, self.peak, self.floor) / self.peak


def step_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Record indices of one optimizer step: positions [step * G, (step + 1) * G) of the
    endless sequence of per-epoch permutations (each seeded by seed and epoch)."""
    out = []
    pos = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        take = min(global_batch - len(out), n - offset)
        out.extend(perm[offset:offset + take])
        pos += take
    return out


def param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay matrices (the prompts, the base's weights when pretraining), not gates or norms."""
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
