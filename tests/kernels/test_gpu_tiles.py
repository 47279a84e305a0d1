"""The GPU's tile shapes under Triton's interpreter: every (BLOCK_M, BLOCK_N) pair a
launcher can pick for a kernel runs that kernel (the others at 64 x 64)
on shapes that cross several of its blocks, causal with a KV-cache chunk and padding,
bidirectional, and packed; forward and all six gradients against the float64 oracle, for
both backwards (fused and deterministic) and both load paths (pointers and tensor
descriptors, where a kernel has both). The
causal full/diagonal split, the edge masks and the dQ partial slots are thereby exercised
with unequal and large blocks, not only with the interpreter's own."""

import pytest

from llama_adapter_fast import set_deterministic
from llama_adapter_fast.kernels import configs
from llama_adapter_fast.kernels.utils import TMA_LAUNCH_COUNTS, kernel_settings
from llama_adapter_fast.ops.testing import Case, PackedCase, check_against_oracle, check_packed


def paths(kernel: str) -> list[tuple[bool, bool]]:
    """(deterministic backward, bulk copies) under which a kernel runs: the deterministic
    backward's kernels read through pointers only; the forward and the fused backward's
    kernels through pointers and through tensor descriptors."""
    if kernel in configs.DETERMINISTIC_BACKWARD:
        return [(True, False)]
    return [(False, False), (False, True)]


TILES = [(kernel, m, n, deterministic, tma) for kernel in configs.TRAINING_KERNELS
         for by_class in [configs.CANDIDATES[kernel]]
         for m, n in sorted({(m, n) for specs in by_class.values() for m, n, _, _ in specs})
         for deterministic, tma in paths(kernel)]


# The tile of the kernels that are not under test in a case.
OTHERS = 64


def cases(m: int, n: int) -> dict:
    """Lengths past two of the larger block and not a multiple of either."""
    span = 2 * max(m, n) + 7
    return {
        "causal_chunk_padded": Case(B=2, Hq=2, Hkv=1, T=span * 2 // 3, S=span, D=16, P=3, mask="empty_rows"),
        "bidirectional": Case(B=1, Hq=2, Hkv=2, T=span, S=span - 9, D=16, P=3, causal=False),
        "packed": PackedCase((span // 2 + 3, 1, span, 0, 5), Hq=2, Hkv=1, D=16, P=3),
    }


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["causal_chunk_padded", "bidirectional", "packed"])
@pytest.mark.parametrize("kernel, m, n, deterministic, tma", TILES,
                         ids=[f"{k}-{m}x{n}-{'tma' if t else 'pointers'}" for k, m, n, _, t in TILES])
def test_gpu_tile_against_the_oracle(kernel, m, n, deterministic, tma, case, monkeypatch):
    for other in configs.TRAINING_KERNELS:  # larger than the interpreter's own: fewer programs to interpret
        monkeypatch.setitem(configs.INTERPRETER_BLOCKS, other, {"BLOCK_M": OTHERS, "BLOCK_N": OTHERS})
    monkeypatch.setitem(configs.INTERPRETER_BLOCKS, kernel, {"BLOCK_M": m, "BLOCK_N": n})
    chosen = cases(m, n)[case]
    before = TMA_LAUNCH_COUNTS[kernel]
    set_deterministic(deterministic)
    try:
        with kernel_settings(tma=tma):
            if isinstance(chosen, PackedCase):
                check_packed(chosen)
            else:
                check_against_oracle(chosen)
    finally:
        set_deterministic(False)
    assert (TMA_LAUNCH_COUNTS[kernel] > before) == tma, "the load path under test did not run"
