"""float32 inputs run their products on tensor cores as tf32x3 (each operand split into a
tf32 part and a tf32 remainder, three tf32 products summed in float32). Triton's
interpreter computes every product in float32 whatever the precision asked, so here its
dot is replaced by an emulation of what the GPU computes for tf32x3, and the kernels must
still meet the float32 tolerance against the float64 oracle."""

import numpy as np
import pytest
from triton._C.libtriton import ir
from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

from llama_adapter_fast.ops.testing import Case, check_against_oracle

pytestmark = pytest.mark.interpreter  # the emulation replaces the interpreter's dot


def to_tf32(x: np.ndarray) -> np.ndarray:
    """Round float32 to tf32 (10 mantissa bits), to nearest with ties away from zero, as
    cvt.rna.tf32.f32 does: add half an ulp to the magnitude's bits, then truncate."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def tf32x3_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a_big, b_big = to_tf32(a), to_tf32(b)
    a_small, b_small = to_tf32(a - a_big), to_tf32(b - b_big)
    # Products of tf32 numbers are exact in float32; the sums are float32.
    small = np.matmul(a_big, b_small, dtype=np.float32) + np.matmul(a_small, b_big, dtype=np.float32)
    return small + np.matmul(a_big, b_big, dtype=np.float32)


@pytest.fixture
def emulated_tf32x3(monkeypatch):
    """Counts the dots that asked for tf32x3 and computes them as the GPU would."""
    calls = {"tf32x3": 0}
    original = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision != ir.INPUT_PRECISION.TF32x3:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        assert a.data.dtype == np.float32 and b.data.dtype == np.float32
        calls["tf32x3"] += 1
        return TensorHandle(tf32x3_matmul(a.data, b.data) + d.data, d.dtype.scalar)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", create_dot)
    return calls


def test_emulation_is_not_float32():
    """The emulation differs from a float32 product (it rounds), and stays close to it."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 64), np.float32), rng.standard_normal((64, 16), np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    tf32_only = to_tf32(a).astype(np.float64) @ to_tf32(b).astype(np.float64)
    emulated = tf32x3_matmul(a, b)
    assert not np.array_equal(emulated, np.matmul(a, b))
    assert np.abs(tf32_only - exact).max() > 1e-3  # one tf32 product is far from float32 accuracy
    assert np.abs(emulated - exact).max() < 1e-4  # three are not


CASES = {
    "gqa_causal": Case(T=37, D=64),
    "bidirectional_padding": Case(causal=False, mask="empty_rows", T=29, shared_prefix=True),
    "kv_cache_chunk_d80": Case(T=9, S=40, D=80),
    "p70": Case(P=70, T=21),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tf32x3_meets_the_float32_tolerance(name, emulated_tf32x3):
    check_against_oracle(CASES[name])
    assert emulated_tf32x3["tf32x3"] > 0, "the float32 kernels did not ask for tf32x3 products"
