"""Property-based checks over random valid shapes and options (bounded in count: each
example runs the kernels in Triton's interpreter)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_adapter_fast.ops.testing import Case, check_against_oracle


@st.composite
def cases(draw) -> Case:
    Hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    T = draw(st.integers(1, 40))
    return Case(
        B=draw(st.integers(1, 2)),
        Hkv=Hkv,
        Hq=Hkv * group,
        T=T,
        S=draw(st.one_of(st.none(), st.integers(0, 48))),
        D=draw(st.sampled_from([16, 24, 40, 64, 80, 96])),
        P=draw(st.integers(1, 40)),
        causal=draw(st.booleans()),
        shared_prefix=draw(st.booleans()),
        gate_shape=draw(st.sampled_from([(), (1,), ("Hq",)])),
        gate_activation=draw(st.sampled_from(["tanh", "identity"])),
        softmax_scale=draw(st.one_of(st.none(), st.floats(0.05, 0.5))),
        mask=draw(st.sampled_from([None, "random", "empty_rows"])),
        transposed=draw(st.booleans()),
    )


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(), seed=st.integers(0, 2**16))
def test_random_shapes_match_oracle(case, seed):
    torch.manual_seed(seed)
    check_against_oracle(case, seed=seed)
