"""Bad input raises ValueError or TypeError naming the argument (docs/design.md, "The public API")."""

import pytest
import torch

from llama_adapter_fast import eager_attention, gated_prefix_attention
from llama_adapter_fast.ops.testing import Case, make_inputs, oracle_attention, rel_error


def call(overrides: dict, backend: str = "triton"):
    tensors, kwargs = make_inputs(Case(B=2, Hq=4, Hkv=2, T=5, D=16, P=3))
    args = dict(zip(["q", "k", "v", "prefix_k", "prefix_v", "gate"], tensors, strict=True))
    kwargs["backend"] = backend
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value(args, kwargs) if callable(value) else value
    return gated_prefix_attention(*args.values(), **kwargs)


BAD = [
    ("q", ValueError, {"q": lambda a, k: a["q"][0]}),  # wrong rank
    ("q", TypeError, {"q": lambda a, k: a["q"].numpy()}),
    ("k", ValueError, {"k": lambda a, k: a["k"][:1]}),  # batch mismatch
    ("k", ValueError, {"k": lambda a, k: a["k"][..., :8]}),  # head dim mismatch
    ("v", ValueError, {"v": lambda a, k: a["v"][:, :, :3]}),
    ("multiple", ValueError, {"k": lambda a, k: torch.randn(2, 3, 5, 16), "v": lambda a, k: torch.randn(2, 3, 5, 16),
                              "prefix_k": lambda a, k: torch.randn(3, 3, 16),
                              "prefix_v": lambda a, k: torch.randn(3, 3, 16)}),
    ("prefix_k", ValueError, {"prefix_k": lambda a, k: a["prefix_k"][:, :1]}),  # wrong kv heads
    ("prefix_k", ValueError, {"prefix_k": lambda a, k: torch.randn(3, 2, 3, 16),
                              "prefix_v": lambda a, k: torch.randn(3, 2, 3, 16)}),  # batch mismatch
    ("prefix_v", ValueError, {"prefix_v": lambda a, k: a["prefix_v"][:, :, :2]}),
    ("P >= 1", ValueError, {"prefix_k": lambda a, k: a["prefix_k"][:, :, :0],
                            "prefix_v": lambda a, k: a["prefix_v"][:, :, :0]}),
    ("k", TypeError, {"k": lambda a, k: a["k"].double()}),  # dtype mismatch
    ("q", TypeError, {n: lambda a, k, n=n: a[n].to(torch.int32) for n in ("q", "k", "v", "prefix_k", "prefix_v")}),
    ("gate", ValueError, {"gate": torch.zeros(3)}),
    ("gate", ValueError, {"gate": torch.zeros(4, 1)}),
    ("gate", TypeError, {"gate": torch.zeros(4, dtype=torch.int64)}),
    ("gate", TypeError, {"gate": "zero"}),
    ("gate_activation", ValueError, {"gate_activation": "sigmoid"}),
    ("backend", ValueError, {"backend": "flash"}),
    ("causal", TypeError, {"causal": "yes"}),
    ("softmax_scale", ValueError, {"softmax_scale": -1.0}),
    ("softmax_scale", TypeError, {"softmax_scale": "0.1"}),
    ("key_padding_mask", ValueError, {"key_padding_mask": torch.ones(2, 4, dtype=torch.bool)}),
    ("key_padding_mask", TypeError, {"key_padding_mask": torch.ones(2, 5)}),
    ("key_padding_mask", TypeError, {"key_padding_mask": [[True] * 5] * 2}),
]


@pytest.mark.parametrize("name,error,overrides", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_bad_input_names_the_argument(name, error, overrides, backend):
    with pytest.raises(error, match=name.split()[0] if name != "P >= 1" else "P"):
        call(overrides, backend)


def test_unsupported_head_dim_for_triton():
    tensors, kwargs = make_inputs(Case(D=272, T=3, P=2))
    with pytest.raises(ValueError, match="head dim"):
        gated_prefix_attention(*tensors, backend="triton", **kwargs)
    gated_prefix_attention(*tensors, backend="sdpa", **kwargs)  # the PyTorch backends take it


def test_float64_is_refused_by_triton_only():
    tensors, kwargs = make_inputs(Case(T=3, P=2, dtype=torch.float64))
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        gated_prefix_attention(*tensors, backend="triton", **kwargs)
    gated_prefix_attention(*tensors, backend="eager", **kwargs)


needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter runs on CPU tensors")


@needs_interpreter
@pytest.mark.interpreter
def test_bfloat16_is_refused_by_triton_under_the_interpreter():
    """The interpreter has no bfloat16 arithmetic: its answer would be garbage, so refuse."""
    tensors, kwargs = make_inputs(Case(T=5, P=3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bfloat16.*interpreter"):
        gated_prefix_attention(*tensors, backend="triton", **kwargs)
    gated_prefix_attention(*tensors, backend="sdpa", **kwargs)  # the PyTorch backends take it
    assert gated_prefix_attention(*tensors, backend="auto", **kwargs).dtype == torch.bfloat16


@needs_interpreter
def test_bfloat16_from_cpu_autocast_is_refused_by_triton_under_the_interpreter():
    tensors, kwargs = make_inputs(Case(T=5, P=3))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="bfloat16.*autocast"):
        gated_prefix_attention(*tensors, backend="triton", **kwargs)
    with torch.autocast("cpu", dtype=torch.float16):  # float16 is computed correctly there
        out = gated_prefix_attention(*tensors, backend="triton", **kwargs)
    eager = eager_attention(*[t.half() for t in tensors[:5]], tensors[5], **kwargs)
    ref = oracle_attention(*[t.half().double() for t in tensors[:5]], tensors[5].double(), **kwargs)
    assert out.dtype == torch.float16
    assert rel_error(out, ref) <= 2 * rel_error(eager, ref) + 1e-4
