"""The decode kernels (split-KV, prefix fused in the combine) against the float64 oracle:
new queries over caches of different lengths per sequence, groups of 1, 4 and 8, P = 1 and
64, shared and per-sample prefixes; the row blocks and key blocks a GPU picks; the choice
between the decode kernels and the training forward; bad input."""

from dataclasses import dataclass

import pytest
import torch

from llama_adapter_fast import gated_prefix_attention, gated_prefix_attention_decode
from llama_adapter_fast.kernels import configs
from llama_adapter_fast.kernels.decode import MIN_KEYS_PER_SPLIT, decode_forward, num_splits
from llama_adapter_fast.ops.testing import DEVICE, decode_oracle, expect_launches, oracle_attention, rel_error

DECODE = ("decode", "decode_combine")
NOT_TRAINING = {"forward": 0, "decode": 1, "decode_combine": 1}  # one call: the decode kernels alone


@dataclass
class DecodeCase:
    lengths: tuple[int, ...]
    Hq: int = 4
    Hkv: int = 1
    T: int = 1
    D: int = 32
    P: int = 10
    s_max: int | None = None  # the cache's capacity; default: the longest length + 5
    starts: tuple[int, ...] | None = None
    per_sample_prefix: bool = False
    per_sample_gate: bool = False  # (B, Hq): one per sequence and query head
    causal: bool = True
    dtype: torch.dtype = torch.float32


def make(c: DecodeCase, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, S = len(c.lengths), c.s_max or max(c.lengths) + 5

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(c.dtype).to(DEVICE)

    # The cache as a preallocated (B, S_max, Hkv, D) buffer seen as (B, Hkv, S_max, D).
    k, v = rand(B, S, c.Hkv, c.D).transpose(1, 2), rand(B, S, c.Hkv, c.D).transpose(1, 2)
    prefix = (B, c.Hkv, c.P, c.D) if c.per_sample_prefix else (c.Hkv, c.P, c.D)
    gate = (torch.rand((B, c.Hq) if c.per_sample_gate else c.Hq, generator=g) + 0.25).to(DEVICE)
    gate.view(-1)[::2] *= -1
    lengths = torch.tensor(c.lengths, dtype=torch.int32, device=DEVICE)
    starts = None if c.starts is None else torch.tensor(c.starts, device=DEVICE)
    return rand(B, c.Hq, c.T, c.D), k, v, lengths, starts, rand(*prefix), rand(*prefix), gate


def check(c: DecodeCase, tol: float = 2e-5, floor: float = 1e-4, seed: int = 0) -> float:
    q, k, v, lengths, starts, pk, pv, gate = make(c, seed)
    kwargs = dict(cache_starts=starts, causal=c.causal)
    with torch.no_grad(), expect_launches(*DECODE, times=1):
        out = gated_prefix_attention_decode(q, k, v, lengths, pk, pv, gate, backend="triton", **kwargs)
    ref = decode_oracle(*[x.double() for x in (q, k, v)], lengths, pk.double(), pv.double(), gate.double(),
                        **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = rel_error(out, ref)
    if c.dtype == torch.float32:
        assert err < tol, err
    else:  # FlashAttention's criterion against the same masks in PyTorch, in that dtype
        eager = gated_prefix_attention_decode(q, k, v, lengths, pk, pv, gate, backend="eager", **kwargs)
        assert err <= 2 * rel_error(eager, ref) + floor, (err, rel_error(eager, ref))
    return err


CASES = {
    # lengths up to a few thousand, different per sequence (several splits each)
    "t1_mqa_long": DecodeCase((2500, 700, 33), Hq=4, Hkv=1, P=64),
    "t1_mha_p1": DecodeCase((300, 17, 1), Hq=2, Hkv=2, P=1),
    "t4_group4_per_sample": DecodeCase((900, 4, 50), Hq=8, Hkv=2, T=4, per_sample_prefix=True),
    "t8_group8_row_blocks": DecodeCase((129, 640), Hq=8, Hkv=1, T=8, P=64),  # 64 rows: 4 interpreter row blocks
    "t2_group1_left_padded": DecodeCase((40, 40, 40), Hq=2, Hkv=2, T=2, starts=(0, 7, 39)),  # one sees 1 key
    "t5_queries_before_the_start": DecodeCase((20, 30), Hq=4, Hkv=2, T=5, starts=(17, 0)),  # 2 see no key
    "t3_bidirectional": DecodeCase((70, 9), Hq=4, Hkv=2, T=3, causal=False, per_sample_prefix=True),
    "t2_per_sample_gates": DecodeCase((90, 31, 7), Hq=4, Hkv=2, T=2, per_sample_prefix=True, per_sample_gate=True),
    "t1_d80": DecodeCase((333, 100), Hq=4, Hkv=2, D=80),
    "t2_d256": DecodeCase((300, 20), Hq=4, Hkv=2, T=2, D=256),  # float32 products as FMAs (ieee) past 128
    "t6_a_cache_far_longer": DecodeCase((50, 3), Hq=4, Hkv=2, T=3, s_max=1000),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_the_oracle(name):
    check(CASES[name])


def test_float16():
    check(DecodeCase((700, 33, 5), Hq=8, Hkv=2, T=3, P=64, dtype=torch.float16))


# The GPU's tiles of the decode kernels, as the interpreter's blocks (the others' at 16 x 16).
TILES = [(kernel, m, n) for kernel in DECODE
         for m, n in sorted({(m, n) for specs in configs.CANDIDATES[kernel].values() for m, n, _, _ in specs})]


@pytest.mark.interpreter
@pytest.mark.parametrize("kernel, m, n", TILES, ids=[f"{k}-{m}x{n}" for k, m, n in TILES])
def test_gpu_tiles(kernel, m, n, monkeypatch):
    monkeypatch.setitem(configs.INTERPRETER_BLOCKS, kernel, {"BLOCK_M": m, "BLOCK_N": n})
    # rows (a group of 8 x 5 queries = 40) fill part of a block or cross blocks; keys cross
    # splits and blocks, and end inside one
    check(DecodeCase((3 * n * 4 + 7, 2 * n + 1), Hq=8, Hkv=1, T=5, P=n + 3, per_sample_prefix=True))


def test_splits_change_nothing_but_rounding_and_repeat_exactly():
    q, k, v, lengths, starts, pk, pv, gate = make(CASES["t1_mqa_long"])
    act = torch.tanh(gate.float()).repeat(q.shape[0])  # one per sequence and head, as the kernels take it
    outs = [decode_forward(q, k, v, pk, pv, act, None, lengths, None, True, 32**-0.5, splits=s) for s in (1, 3, 10)]
    for out in outs[1:]:
        assert rel_error(out, outs[0]) < 1e-6
    again = decode_forward(q, k, v, pk, pv, act, None, lengths, None, True, 32**-0.5, splits=3)
    assert torch.equal(again, outs[1])  # no atomics: the splits are merged in order


def test_split_count():
    assert num_splits(programs=8, keys=4096, sm_count=132) == 4096 // MIN_KEYS_PER_SPLIT  # bounded by the keys
    assert num_splits(programs=8, keys=10**6, sm_count=132) == 33  # two programs per multiprocessor
    assert num_splits(programs=512, keys=10**6, sm_count=132) == 1  # enough programs already
    assert num_splits(programs=1, keys=10**7, sm_count=1000) == 64  # at most MAX_SPLITS
    assert num_splits(programs=4, keys=0, sm_count=132) == 1


def test_lengths_past_the_cache_read_the_cache():
    q, k, v, _, _, pk, pv, gate = make(DecodeCase((10, 10), Hq=4, Hkv=2, s_max=12))
    with torch.no_grad():
        out = gated_prefix_attention_decode(q, k, v, torch.tensor([12, 10**6]), pk, pv, gate, backend="triton")
        full = gated_prefix_attention_decode(q, k, v, torch.tensor([12, 12]), pk, pv, gate, backend="triton")
    assert torch.equal(out, full)


# ------------------------------------------------------------------------------------------
# The padded op's choice of kernels


def padded(T: int, S: int = 90, mask: bool = True):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, T, 32, generator=g), torch.randn(2, 2, S, 32, generator=g), torch.randn(2, 2, S, 32)
    pk, pv, gate = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g), torch.tensor([0.5, -1.0])
    key_padding = torch.rand(2, S, generator=g) > 0.3 if mask else None
    return [x.to(DEVICE) for x in (q, k, v, pk, pv)] + [gate.repeat(2).to(DEVICE)], key_padding


@pytest.mark.parametrize("T", [1, 7, 16])
def test_the_op_decodes_few_queries_without_gradient(T):
    tensors, mask = padded(T)
    mask = mask.to(DEVICE)
    ref = oracle_attention(*[t.double() for t in tensors], key_padding_mask=mask)
    with torch.no_grad(), expect_launches("forward", *DECODE, times=NOT_TRAINING):
        out = gated_prefix_attention(*tensors, key_padding_mask=mask, backend="triton")
    assert rel_error(out, ref) < 2e-5
    with torch.no_grad(), expect_launches("forward", *DECODE, times={"forward": 1, "decode": 0, "decode_combine": 0}):
        kept = gated_prefix_attention(*tensors, key_padding_mask=mask, backend="triton", decode=False)
    assert rel_error(kept, ref) < 2e-5


def test_the_op_trains_through_the_training_forward():
    tensors, mask = padded(1)
    tensors[0].requires_grad_()
    with expect_launches("forward", *DECODE, times={"forward": 1, "decode": 0, "decode_combine": 0}):
        gated_prefix_attention(*tensors, key_padding_mask=mask, backend="triton").sum().backward()
    with torch.no_grad(), expect_launches("forward", *DECODE, times={"forward": 1, "decode": 0, "decode_combine": 0}):
        gated_prefix_attention(*padded(17)[0], backend="triton")  # 17 queries: past the decode path


def test_decode_option_errors():
    tensors, _ = padded(1)
    with pytest.raises(TypeError, match="decode must be a bool"):
        gated_prefix_attention(*tensors, backend="triton", decode="yes")
    with torch.no_grad(), pytest.raises(ValueError, match="decode=True.*backend is 'sdpa'"):
        gated_prefix_attention(*tensors, backend="sdpa", decode=True)
    with torch.no_grad(), pytest.raises(ValueError, match="decode=True takes 1 to 16"):
        gated_prefix_attention(*padded(17)[0], backend="triton", decode=True)
    tensors[0].requires_grad_()
    with pytest.raises(ValueError, match="decode=True computes no gradient"):
        gated_prefix_attention(*tensors, backend="triton", decode=True)


def test_reference_backends_of_the_decode_op():
    c = CASES["t5_queries_before_the_start"]
    q, k, v, lengths, starts, pk, pv, gate = make(c)
    ref = decode_oracle(*[x.double() for x in (q, k, v)], lengths, pk.double(), pv.double(), gate.double(),
                        cache_starts=starts)
    for backend in ("sdpa", "eager"):
        out = gated_prefix_attention_decode(q, k, v, lengths, pk, pv, gate, cache_starts=starts, backend=backend)
        assert rel_error(out, ref) < 1e-6, backend


@pytest.mark.parametrize("change, error, match", [
    (dict(q=lambda a: a["q"].expand(-1, -1, 17, -1)), ValueError, "1 to 16 new queries"),
    (dict(cache_lengths=lambda a: a["cache_lengths"].float()), TypeError, "cache_lengths must have dtype"),
    (dict(cache_lengths=lambda a: a["cache_lengths"][:1]), ValueError, r"cache_lengths must have shape \(B,\)"),
    (dict(cache_lengths=lambda a: None), TypeError, "cache_lengths must be an integer tensor"),
    (dict(cache_starts=lambda a: [0, 0]), TypeError, "cache_starts must be an integer tensor"),
    (dict(k_cache=lambda a: a["k_cache"][:1]), ValueError, "k_cache must have shape"),
    (dict(v_cache=lambda a: a["v_cache"][:, :, :5]), ValueError, "v_cache must have k_cache's shape"),
    (dict(max_cache_len=lambda a: 10**6), ValueError, "max_cache_len must be between"),
    (dict(max_cache_len=lambda a: 3.0), TypeError, "max_cache_len must be an int"),
    (dict(k_cache=lambda a: a["k_cache"].half(), v_cache=lambda a: a["v_cache"].half()), TypeError, "k_cache must"),
    (dict(q=lambda a: a["q"].clone().requires_grad_()), ValueError, "computes no gradient"),
])
def test_bad_input_names_the_argument(change, error, match):
    q, k, v, lengths, _, pk, pv, gate = make(DecodeCase((20, 9), Hq=4, Hkv=2))
    args = dict(q=q, k_cache=k, v_cache=v, cache_lengths=lengths, prefix_k=pk, prefix_v=pv, gate=gate)
    options = {}
    for key, fn in change.items():
        (args if key in args else options)[key] = fn({**args, "cache_starts": None})
    with pytest.raises(error, match=match):
        gated_prefix_attention_decode(**args, **options, backend="triton")

