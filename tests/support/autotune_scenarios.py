"""Scenarios of the GPU-only launch path, run by test_autotune.py in a process of their own
(no interpreter, the CUDA driver replaced by fake_gpu.FakeDriver): Triton's own autotuner
drives the package's prune with the keyword arguments it really passes, the candidates are
compiled for sm_90 with ptxas, and only the launches and their timings are pretended.

    python tests/support/autotune_scenarios.py autotuned|limits|fixed|decode
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the scenarios compile: run them without the interpreter"

from fake_gpu import FakeDriver  # noqa: E402

fake = FakeDriver.install(arch=90)

import torch  # noqa: E402

from llama_adapter_fast.kernels import backward as bwd  # noqa: E402
from llama_adapter_fast.kernels import configs  # noqa: E402
from llama_adapter_fast.kernels import decode as dec  # noqa: E402
from llama_adapter_fast.kernels import forward as fwd  # noqa: E402

# The package's kernel of a launch: the dQ and dK/dV functions serve both backwards.
KERNEL_NAMES = {"_fwd_kernel": "forward", "_decode_split_kernel": "decode", "_decode_combine_kernel": "decode_combine"}


def kernel_name(launch) -> str:
    if launch.kernel == "_dq_kernel":
        return "backward_dq" if launch.constants["WORDS"] else "backward_prefix"
    if launch.kernel == "_dkdv_kernel":
        return "backward" if launch.constants["FUSED_DQ"] else "backward_dkdv"
    return KERNEL_NAMES[launch.kernel]
B, H, HKV, T, D, P = 1, 4, 2, 300, 64, 10


def problem():
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    q, k, v = rand(B, H, T, D), rand(B, HKV, T, D), rand(B, HKV, T, D)
    return q, k, v, rand(HKV, P, D), rand(HKV, P, D), torch.full((H,), 0.5)


def forward_only():
    q, k, v, pk, pv, a = problem()
    return fwd.forward(q, k, v, pk, pv, a, None, True, D**-0.5)


def forward_and_backward():
    """A forward and both backwards: fused, then deterministic."""
    q, k, v, pk, pv, a = problem()
    out, lse1, lse2 = fwd.forward(q, k, v, pk, pv, a, None, True, D**-0.5)
    for deterministic in (False, True):
        bwd.backward(torch.ones_like(out), q, k, v, pk, pv, a, None, out, lse1, lse2, True, D**-0.5, deterministic)


def candidate(launch) -> configs.Candidate:
    return configs.Candidate(launch.constants["BLOCK_M"], launch.constants["BLOCK_N"], launch.num_warps,
                             launch.num_stages)


def by_kernel(launches) -> dict[str, list]:
    found: dict[str, list] = {}
    for launch in launches:
        found.setdefault(kernel_name(launch), []).append(launch)
    return found


def grid_of(kernel: str, c: configs.Candidate) -> int:
    if kernel == "forward":
        return -(-T // c.block_m) * B * H
    if kernel in ("backward_dq", "backward_prefix"):
        return -(-T // configs.dq_block_m(D, 2, kernel)) * B * H
    return -(-T // c.block_n) * B * HKV


def autotuned() -> None:
    """Every candidate that fits is timed, the fastest is launched on its own grid."""
    # The last candidate of each kernel is the "fastest": the tuner must pick it, not the first.
    last = {k: configs.candidates(k, D, 2)[-1] for k in configs.TRAINING_KERNELS}
    fake.timing = lambda launch: 0.5 if candidate(launch) == last[kernel_name(launch)] else 1.0
    forward_and_backward()
    timed = by_kernel(fake.launches)
    assert set(timed) == set(configs.AUTOTUNERS) == set(last), (timed, configs.AUTOTUNERS)
    for kernel, tuner in configs.AUTOTUNERS.items():  # Triton 3.9 refuses a key naming anything else
        assert tuner.keys and set(tuner.keys) <= set(tuner.fn.arg_names), (kernel, tuner.keys)
    for kernel, launches in timed.items():
        expected = configs.candidates(kernel, D, 2)
        *benchmarked, final = launches
        assert [candidate(x) for x in benchmarked] == expected, (kernel, [candidate(x) for x in benchmarked])
        assert candidate(final) == last[kernel], (kernel, candidate(final))
        assert final.grid == (grid_of(kernel, last[kernel]), 1, 1), (kernel, final.grid)
        # The prune compiled what the launch uses: the shared memory it measured is the binary's.
        assert all(x.shared > 0 for x in launches), kernel
    # The same key again: tuned once, launched once more per kernel, nothing re-timed.
    count = len(fake.launches)
    forward_and_backward()
    assert len(fake.launches) == count + len(last), len(fake.launches) - count
    print("ok: autotuned", {k: len(v) - 1 for k, v in timed.items()})


def limits() -> None:
    """A shared-memory limit keeps exactly the forward candidates whose binaries fit it;
    below every candidate the launch is a ValueError naming the kernel."""
    forward_and_backward()
    shared = {candidate(x): x.shared for x in fake.launches if kernel_name(x) == "forward"}
    sizes = sorted(set(shared.values()))
    assert len(sizes) > 1, shared
    limit = sizes[len(sizes) // 2 - 1] if len(sizes) > 2 else sizes[0]
    fake.shared_limit = limit
    configs.device_shared_limit.cache_clear()
    for tuner in configs.AUTOTUNERS.values():
        tuner.cache.clear()
    start = len(fake.launches)
    forward_only()
    timed = [candidate(x) for x in fake.launches[start:] if kernel_name(x) == "forward"][:-1]
    assert timed == [c for c in configs.candidates("forward", D, 2) if shared[c] <= limit], (timed, shared, limit)
    fake.shared_limit = 1024
    configs.device_shared_limit.cache_clear()
    for tuner in configs.AUTOTUNERS.values():
        tuner.cache.clear()
    try:
        forward_only()
    except ValueError as exc:
        assert "no configuration of the forward kernel fits" in str(exc), exc
    else:
        raise AssertionError("a limit below every candidate was accepted")
    print("ok: limits", shared, limit)


def fixed() -> None:
    """Autotuning off: the first candidate that fits is launched, chosen once per binary."""
    assert not configs.AUTOTUNERS
    compiles = []
    real = configs.compiled_shared_bytes

    def counting(fn, args, meta, config):
        compiles.append(config)
        return real(fn, args, meta, config)

    configs.compiled_shared_bytes = counting
    first = configs.candidates("forward", D, 2)[0]
    forward_and_backward()
    launched = by_kernel(fake.launches)
    for kernel, launches in launched.items():
        assert [candidate(x) for x in launches] == [configs.candidates(kernel, D, 2)[0]], kernel
    kernels = len(configs.TRAINING_KERNELS)
    assert len(compiles) == kernels, compiles
    forward_and_backward()
    assert len(compiles) == kernels, f"the second call compiled again: {compiles[kernels:]}"
    assert len(fake.launches) == 2 * kernels
    # A limit the first forward candidate does not fit: the next one that fits is used.
    fake.shared_limit = fake.launches[0].shared - 1
    configs.device_shared_limit.cache_clear()
    configs._CHOSEN.clear()
    start = len(fake.launches)
    forward_only()
    chosen = candidate(fake.launches[start])
    assert chosen != first and fake.launches[start].shared <= fake.shared_limit, chosen
    print("ok: fixed", first, chosen)


def decode() -> None:
    """The decode launcher sizes its splits by the device's multiprocessors (asked of the
    driver) and picks the row block that holds a kv group's rows."""

    def step(Hq, Hkv, T, S, D):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, Hq, T, D, generator=g).to(torch.bfloat16)
        k = torch.randn(1, Hkv, S, D, generator=g).to(torch.bfloat16)
        pk = torch.randn(Hkv, P, D, generator=g).to(torch.bfloat16)
        start = len(fake.launches)
        dec.decode_forward(q, k, k, pk, pk, torch.full((Hq,), 0.5), None, torch.tensor([S], dtype=torch.int32),
                           None, True, D**-0.5)
        split, combine = fake.launches[start:]
        assert [kernel_name(x) for x in (split, combine)] == ["decode", "decode_combine"]
        return split, combine

    # LLaMA-3-8B's heads at one query: 4 rows a kv head, 8 programs without splits; 132 SMs
    # want 2 x 132 programs, 4096 keys allow 16 splits of 256.
    split, combine = step(32, 8, 1, 4096, 128)
    assert split.constants["BLOCK_M"] == 16 and split.grid[0] == 8 * 16, (split.constants, split.grid)
    assert combine.grid[0] == 8, combine.grid
    # Fewer multiprocessors, fewer splits: 2 x 10 programs over 8 (sequence, kv head) pairs.
    fake.multiprocessors = 10
    configs._sm_count.cache_clear()
    split, _ = step(32, 8, 1, 4096, 128)
    assert split.grid[0] == 8 * 3, split.grid
    # A group of 8 and 16 queries: 128 rows in one row block of the largest tile.
    split, combine = step(32, 4, 16, 600, 128)
    assert split.constants["BLOCK_M"] == 128 and combine.constants["BLOCK_M"] == 128
    print("ok: decode", split.grid, combine.grid)


def tma() -> None:
    """On an sm_90 the training kernels take the bulk-copy path (tensor descriptors made in
    the kernels, which then need global scratch at launch): every launch of them finds an
    allocator, in this thread and in a fresh one (autograd's device threads start without
    one), and the pointer path remains for tensors the copy engine cannot read."""
    import threading

    from llama_adapter_fast.kernels import utils

    utils.ASSUMED_ARCH[0] = 90
    forward_and_backward()
    thread = threading.Thread(target=forward_and_backward)
    thread.start()
    thread.join()
    fused = {"forward", "backward_prefix", "backward"}
    by_name = by_kernel(fake.launches)
    for name in fused:
        assert all(x.constants["TMA"] for x in by_name[name]), name
    assert all(x.constants["DQ_DESC_ADD"] for x in by_name["backward"])  # the bulk reduce-add
    assert not any(x.constants["TMA"] for x in by_name["backward_dkdv"] + by_name["backward_dq"])
    asked = {name for name, size, given in fake.scratch if size <= given}
    assert {"_fwd_kernel", "_dq_kernel", "_dkdv_kernel"} <= asked, fake.scratch
    assert len(fake.scratch) == 2 * len(fused), fake.scratch
    # A row stride of 136 bytes (head dim 68 in bf16) is no multiple of 16, and head dim 32
    # is below utils.TMA_MIN_HEAD_DIM: pointers.
    g = torch.Generator().manual_seed(0)
    for d in (68, 32):
        start = len(fake.launches)
        q = torch.randn(1, 2, 64, d, generator=g).to(torch.bfloat16)
        pk = torch.randn(2, 4, d, generator=g).to(torch.bfloat16)
        fwd.forward(q, q, q, pk, pk, torch.full((2,), 0.5), None, True, d**-0.5)
        assert not fake.launches[start].constants["TMA"], d
    print("ok: tma", fake.scratch[:3])


if __name__ == "__main__":
    {"autotuned": autotuned, "limits": limits, "fixed": fixed, "decode": decode, "tma": tma}[sys.argv[1]]()
