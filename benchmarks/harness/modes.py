"""Timing one implementation in the three modes of a training benchmark (forward, backward,
forward and backward), trying its variants until a backend accepts one, and telling a
refusal and an out-of-memory apart."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from benchmarks.harness.timing import is_out_of_memory, peak_memory_mib, release_memory

MODES = ("fwd", "bwd", "fwd+bwd")


class Refused(Exception):
    """No variant can run here (a backend refused the inputs, or a compile failed)."""


def first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


def relative_error(x: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """||x - ref|| / ||ref|| in float64; NaN where either is missing."""
    if x is None or ref is None:
        return float("nan")
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def measure_variants(variants: Sequence[tuple[Callable[[], torch.Tensor], str]], inputs: tuple[torch.Tensor, ...],
                     grad_out: torch.Tensor, device: torch.device, timer) -> tuple[dict, str]:
    """Time the first of `variants` ((forward, note) pairs) that runs, in the three modes.

    The first forward+backward also gives the peak memory. Returns ({"peak": MiB, mode:
    {"timing", "status"}}, the note of the variant that ran) and raises Refused, with the
    backends' reasons, when none runs."""
    refusals: list[str] = []
    for forward, variant_note in variants:
        def fwd_bwd(forward=forward):
            return torch.autograd.grad(forward(), inputs, grad_out)

        failure = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                peak = peak_memory_mib(fwd_bwd, device)
            except RuntimeError as exc:
                failure = ("oom" if is_out_of_memory(exc) else "refused", first_line(str(exc)))
        if failure is None:
            note = variant_note + (f" ({refusals[0]})" if variant_note and refusals else "")
            return _time_modes(forward, fwd_bwd, inputs, grad_out, timer, peak), note
        release_memory()
        kind, message = failure
        if kind == "oom":
            # The forward alone may still fit: it keeps less than forward+backward does.
            return _time_forward_only(forward, timer), "out of memory in forward+backward"
        # SDPA says in a warning why it refused a backend; keep it as the reason.
        reasons = [first_line(str(w.message)) for w in caught]
        refusals.append(reasons[0] if reasons else message)
    raise Refused("; ".join(dict.fromkeys(refusals)))


def _time_modes(fwd, fwd_bwd, inputs, grad_out, timer, peak) -> dict:
    results: dict = {"peak": peak}
    for mode in MODES:
        try:
            if mode == "fwd":
                timing = timer(fwd)
            elif mode == "bwd":
                out = fwd()
                timing = timer(lambda out=out: torch.autograd.grad(out, inputs, grad_out, retain_graph=True))
                del out
            else:
                timing = timer(fwd_bwd)
            results[mode] = {"timing": timing, "status": "ok"}
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            results[mode] = {"timing": None, "status": "oom"}
            release_memory()
    return results


def _time_forward_only(fwd, timer) -> dict:
    results: dict = {"peak": None, "bwd": {"timing": None, "status": "oom"},
                     "fwd+bwd": {"timing": None, "status": "oom"}}
    try:
        results["fwd"] = {"timing": timer(fwd), "status": "ok"}
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        results["fwd"] = {"timing": None, "status": "oom"}
    release_memory()
    return results
