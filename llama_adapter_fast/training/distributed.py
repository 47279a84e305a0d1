"""Data-parallel set-up: the process group torchrun starts (NCCL on GPUs, gloo on CPUs),
this process's device, and the collectives the loop needs."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llama_adapter_fast.files import first_line


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs,
    gloo on CPUs. Returns the ranks and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device is None:
        device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        # A group left to the interpreter's teardown can abort the process: gloo's worker
        # threads still hold tensors whose release needs the GIL of an interpreter that is
        # gone ("terminate called without an active exception", SIGABRT). Close it at exit.
        atexit.register(close_distributed)
    return info, dev


def close_distributed() -> None:
    """Destroy the default process group, if one is open (a no-op otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device of a --device option (None: cuda where there is one, else cpu), checked
    by allocating on it, so that a typo or a missing GPU is a clear error up front."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N, ...)") from None
    if dev.type == "meta":
        raise ValueError("--device meta holds no data: use cpu or cuda")
    try:
        torch.empty(0, device=dev)
    except Exception as exc:  # each backend fails its own way (AssertionError, RuntimeError, ...)
        raise ValueError(f"--device {name}: not available on this machine ({first_line(exc)})") from None
    return dev


def all_reduce_max(value: int, device: torch.device) -> int:
    x = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def all_reduce_sum(x: torch.Tensor, info: Dist) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
