"""float16 through the Triton kernels by FlashAttention's criterion: no more than twice the
error of the eager backend run in the same dtype (both against the float64 oracle), plus a
small floor. bfloat16 dot products are wrong in Triton's interpreter (it has no bfloat16
arithmetic), so on the CPU bfloat16 is checked through the sdpa and eager backends;
benchmarks/gpu_check.py checks it through the kernels on a GPU."""

import pytest
import torch

from llama_adapter_fast import eager_attention, sdpa_attention
from llama_adapter_fast.ops.testing import Case, check_low_precision, errors_against_oracle, make_inputs

FLOOR = 1e-4

FP16_CASES = {
    "gqa_causal": Case(dtype=torch.float16),
    "masked_bidirectional_shared": Case(dtype=torch.float16, mask="empty_rows", causal=False, shared_prefix=True),
    "d80_p1_kv_chunk": Case(dtype=torch.float16, D=80, T=13, S=40, P=1),
    "mqa_d128_transposed": Case(dtype=torch.float16, Hkv=1, D=128, B=1, T=17, transposed=True),
}


@pytest.mark.parametrize("name", list(FP16_CASES))
def test_float16_triton_within_twice_eager(name):
    check_low_precision(FP16_CASES[name], FLOOR)


def errors(fn, tensors, kwargs) -> list[float]:
    return list(errors_against_oracle(fn, tensors, kwargs).values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [Case(), Case(mask="empty_rows", T=12, S=30), Case(causal=False, shared_prefix=True)])
def test_low_precision_sdpa_within_twice_eager(dtype, case):
    case.dtype = dtype
    tensors, kwargs = make_inputs(case)
    sdpa = errors(sdpa_attention, tensors, kwargs)
    eager = errors(eager_attention, tensors, kwargs)
    for s, e in zip(sdpa, eager, strict=True):
        assert s <= 2 * e + FLOOR
        assert e < (2e-2 if dtype == torch.bfloat16 else 3e-3)
