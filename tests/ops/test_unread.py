"""Masked means unread: memory outside a sequence's keys (padding, a cache's unused tail, the
positions before `cache_starts`, the other sequences of a pack) cannot change any output or
gradient, on any backend, whatever it holds: NaN and infinities included.

Each test runs the same problem twice, the memory outside the sequences filled once with
finite garbage and once with NaN or an infinity, and asks for the same results, and for
zero gradients wherever a key is not read."""

import contextlib

import pytest
import torch

from llama_adapter_fast import gated_prefix_attention, gated_prefix_attention_decode, gated_prefix_attention_varlen
from llama_adapter_fast.integrations.masked_attention import masked_gated_prefix_attention
from llama_adapter_fast.ops.testing import DEVICE, expect_launches

# The poisoned memory is read (by its own sequence, in the packed tests) on purpose: the
# interpreter's numpy says so in warnings that are expected here.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")

BACKENDS = ["triton", "sdpa", "eager"]
FILLS = [float("nan"), float("inf"), float("-inf")]
TRAINING = ("forward", "backward_prefix", "backward")
DECODE = ("decode", "decode_combine")


def launches(backend: str, *names: str):
    return expect_launches(*names) if backend == "triton" else contextlib.nullcontext()


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def run_with_grads(fn, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(randn(*out.shape, seed=9))
    return out.detach(), [x.grad for x in leaves]


def assert_same(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    assert torch.isfinite(b).all(), f"{name}: the memory outside the sequences reached the result"
    torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_is_unread(backend, causal, fill):
    """Padding keys (the second sequence's last 5, all but one of the third's) hold garbage:
    outputs and every gradient are unchanged, the padding keys' gradients are 0."""
    B, Hq, Hkv, T, D, P = 3, 4, 2, 13, 24, 3
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[1, -5:] = False
    mask[2, 1:] = False
    q, k, v = randn(B, Hq, T, D, seed=1), randn(B, Hkv, T, D, seed=2), randn(B, Hkv, T, D, seed=3)
    pk, pv, gate = randn(Hkv, P, D, seed=4), randn(Hkv, P, D, seed=5), randn(Hq, seed=6)
    padding = ~mask[:, None, :, None]

    def fn(q, k, v, pk, pv, gate):
        return gated_prefix_attention(q, k, v, pk, pv, gate, key_padding_mask=mask, causal=causal, backend=backend)

    results = []
    for garbage in (randn(*k.shape, seed=7) * 1e3, torch.full_like(k, fill)):
        inputs = [q, k.where(~padding, garbage), v.where(~padding, garbage), pk, pv, gate]
        with launches(backend, *TRAINING):
            results.append(run_with_grads(fn, inputs))
    (out_a, grads_a), (out_b, grads_b) = results
    assert_same(out_a, out_b, "out")
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v", "dgate"), grads_a, grads_b, strict=True):
        assert_same(a, b, name)
    for name, grad in (("dk", grads_b[1]), ("dv", grads_b[2])):
        assert not grad.masked_select(padding).any(), f"{name} of a padding key is not 0"


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_is_unread_when_decoding(backend, fill):
    """One new query per sequence over a padded cache (the decode kernels' masked path)."""
    B, Hq, Hkv, S, D, P = 2, 4, 1, 40, 32, 5
    mask = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    mask[0, :7] = False  # left padding
    mask[1, 30:] = False
    q, k, v = randn(B, Hq, 1, D, seed=1), randn(B, Hkv, S, D, seed=2), randn(B, Hkv, S, D, seed=3)
    pk, pv, gate = randn(Hkv, P, D, seed=4), randn(Hkv, P, D, seed=5), randn(Hq, seed=6)
    padding = ~mask[:, None, :, None]
    outs = []
    for garbage in (randn(*k.shape, seed=7) * 1e3, torch.full_like(k, fill)):
        with torch.no_grad(), launches(backend, *DECODE):
            outs.append(gated_prefix_attention(q, k.where(~padding, garbage), v.where(~padding, garbage), pk, pv,
                                               gate, key_padding_mask=mask, causal=False, backend=backend))
    assert_same(*outs, "out")


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_outside_the_sequences_is_unread(backend, fill):
    """A preallocated cache: positions before cache_starts and from cache_lengths on hold
    garbage (a `torch.empty` cache), for T = 1 and a chunk of T = 3."""
    B, Hq, Hkv, S, D, P = 3, 6, 2, 70, 40, 1
    lengths = torch.tensor([20, 70, 33], device=DEVICE)
    starts = torch.tensor([4, 0, 32], device=DEVICE)
    position = torch.arange(S, device=DEVICE)
    held = ((position >= starts[:, None]) & (position < lengths[:, None]))[:, None, :, None]
    k, v = randn(B, Hkv, S, D, seed=2), randn(B, Hkv, S, D, seed=3)
    pk, pv, gate = randn(B, Hkv, P, D, seed=4), randn(B, Hkv, P, D, seed=5), randn(Hq, seed=6)
    for T in (1, 3):
        q = randn(B, Hq, T, D, seed=T)
        outs = []
        for garbage in (randn(*k.shape, seed=7) * 1e3, torch.full_like(k, fill)):
            with torch.no_grad(), launches(backend, *DECODE):
                outs.append(gated_prefix_attention_decode(q, k.where(held, garbage), v.where(held, garbage), lengths,
                                                          pk, pv, gate, cache_starts=starts, backend=backend))
        assert_same(*outs, f"out (T = {T})")


def packed_problem():
    """Three packed sequences of 9, 14 and 6 tokens; the second is the one poisoned."""
    cu = torch.tensor([0, 9, 23, 29], dtype=torch.int32, device=DEVICE)
    Hq, Hkv, D, P = 4, 2, 24, 3
    total = int(cu[-1])
    inputs = [randn(total, Hq, D, seed=1), randn(total, Hkv, D, seed=2), randn(total, Hkv, D, seed=3),
              randn(3, Hkv, P, D, seed=4), randn(3, Hkv, P, D, seed=5), randn(Hq, seed=6)]
    rows = torch.zeros(total, dtype=torch.bool, device=DEVICE)
    rows[9:23] = True
    return cu, inputs, rows


def check_packed_sequences_unread(fn, fill) -> None:
    """NaN or an infinity in one sequence's keys and values: the other sequences' outputs
    and gradients are unchanged."""
    cu, (q, k, v, pk, pv, gate), poisoned = packed_problem()
    results = []
    for garbage in (randn(*k.shape, seed=7) * 1e3, torch.full_like(k, fill)):
        inputs = [q, k.where(~poisoned[:, None, None], garbage), v.where(~poisoned[:, None, None], garbage),
                  pk, pv, gate]
        results.append(run_with_grads(lambda q, k, v, pk, pv, gate: fn(q, k, v, cu, pk, pv, gate), inputs))
    (out_a, grads_a), (out_b, grads_b) = results
    others = ~poisoned
    assert_same(out_a[others], out_b[others], "out of the other sequences")
    for name, i in (("dq", 0), ("dk", 1), ("dv", 2)):
        assert_same(grads_a[i][others], grads_b[i][others], f"{name} of the other sequences")
    for name, i in (("dprefix_k", 3), ("dprefix_v", 4)):
        assert_same(grads_a[i][[0, 2]], grads_b[i][[0, 2]], f"{name} of the other sequences")


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_sequences_of_a_pack_are_unread(backend, fill):
    def fn(q, k, v, cu, pk, pv, gate):
        return gated_prefix_attention_varlen(q, k, v, cu, cu, 14, 14, pk, pv, gate, backend=backend)

    with launches(backend, *TRAINING):
        check_packed_sequences_unread(fn, fill)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_other_sequences_of_a_pack_are_unread_when_compiled(backend):
    """torch.compile traces the eager and sdpa backends' packed path without their loop over
    the sequences (it reads data): the sequences padded into one batch."""

    def fn(q, k, v, cu, pk, pv, gate):
        return gated_prefix_attention_varlen(q, k, v, cu, cu, 14, 14, pk, pv, gate, backend=backend)

    torch._dynamo.reset()
    check_packed_sequences_unread(torch.compile(fn, fullgraph=True, backend="aot_eager"), float("nan"))


def test_padding_is_unread_under_a_custom_mask():
    """The integrations' masked path (a 4-d mask that is not causal attention plus key
    padding, here a sliding window of 4) over a padded batch."""
    B, H, T, D, P = 2, 2, 11, 16, 3
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[1, :3] = False
    j, t = torch.arange(T, device=DEVICE), torch.arange(T, device=DEVICE)[:, None]
    allowed = ((j <= t) & (j > t - 4))[None, None] & mask[:, None, None, :]
    q, k, v = randn(B, H, T, D, seed=1), randn(B, H, T, D, seed=2), randn(B, H, T, D, seed=3)
    pk, pv, gate = randn(H, P, D, seed=4), randn(H, P, D, seed=5), randn(H, seed=6)
    padding = ~mask[:, None, :, None]

    def fn(q, k, v, pk, pv, gate):
        return masked_gated_prefix_attention(q, k, v, pk, pv, gate, attention_mask=allowed)

    results = [run_with_grads(fn, [q, k.where(~padding, g), v.where(~padding, g), pk, pv, gate])
               for g in (randn(*k.shape, seed=7) * 1e3, torch.full_like(k, float("nan")))]
    (out_a, grads_a), (out_b, grads_b) = results
    valid = mask[:, None, :, None].expand_as(out_a)  # rows of padding queries read nothing real
    assert_same(out_a[valid], out_b[valid], "out")
    assert_same(grads_a[0], grads_b[0], "dq")
