"""Limits a GPU has and Triton's interpreter does not check: offsets past 2**31, CUDA's
grid dimensions, shared memory, and the launch configs the kernels may pick."""

import pytest
import torch

from llama_adapter_fast.kernels import backward as bwd
from llama_adapter_fast.kernels import configs
from llama_adapter_fast.kernels import forward as fwd
from llama_adapter_fast.kernels.configs import CANDIDATES, capture_launches, dq_block_m, fitting
from llama_adapter_fast.ops.testing import GRAD_NAMES, expect_launches, triton_fn


def _sparse(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A storage of `numel` elements of which only the pages written are ever backed by
    memory (5.4 GB of address space here, a few kilobytes of memory): skipped where the
    machine will not reserve that much address space."""
    try:
        return torch.empty(numel, dtype=dtype)
    except RuntimeError as exc:
        pytest.skip(f"this machine will not reserve {numel * dtype.itemsize / 2**30:.1f} GiB of address space ({exc})")


def _strided_inputs(stride: int, T: int = 5, D: int = 16):
    """q, k, v and dO of shape (1, 1, T, D) whose rows lie `stride` elements apart in one
    lazily allocated storage, and a key padding mask with the same row stride."""
    storage = _sparse(T * stride, torch.float16)
    mask_storage = _sparse(T * stride, torch.bool)
    g = torch.Generator().manual_seed(0)
    views = []
    for i in range(4):
        view = storage.as_strided((1, 1, T, D), (0, 0, stride, 1), storage_offset=i * D)
        view.copy_(torch.randn(1, 1, T, D, generator=g).half())
        views.append(view)
    mask = mask_storage.as_strided((1, T), (0, stride))
    mask.copy_(torch.tensor([[True, False, True, True, True][:T]]))
    return views, mask


def test_offsets_past_2_31_elements():
    """Row index times row stride passes 2**31 for q, k, v, dO and the mask: the kernels
    must compute those offsets in 64 bits, and give exactly what they give on compact
    copies of the same values."""
    T, D = 5, 16
    stride = 2**29 + 64  # (T - 1) * stride > 2**31
    (q, k, v, grad_out), mask = _strided_inputs(stride, T, D)
    assert (T - 1) * q.stride(2) > 2**31
    g = torch.Generator().manual_seed(1)
    pk, pv = torch.randn(2, 1, 3, D, generator=g).half()
    gate = torch.tensor([0.7])

    def run(q, k, v, mask, grad_out):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, pk, pv, gate)]
        out = triton_fn(*leaves, key_padding_mask=mask)
        grads = torch.autograd.grad(out, leaves, grad_out)
        return [out, *grads]

    with expect_launches("forward", "backward_prefix", "backward"):
        strided = run(q, k, v, mask, grad_out)
    compact = run(q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous(), grad_out.contiguous())
    for name, a, b in zip(("out", *GRAD_NAMES), strided, compact, strict=True):
        assert torch.equal(a, b), name
        assert torch.isfinite(a).all(), name


def test_grid_stays_within_cuda_limits():
    """More (sequence, head) pairs than CUDA's grid y and z dimensions hold (65,535): every
    launch uses one flat x dimension."""
    B, H, D = 40000, 2, 16
    q = torch.empty(B, H, 1, D)
    k, v = torch.empty(B, H, 3, D), torch.empty(B, H, 3, D)
    pk, pv = torch.empty(H, 4, D), torch.empty(H, 4, D)
    gate = torch.zeros(B * H)  # act(gate) of each sequence and head
    with capture_launches() as launches:
        out, lse1, lse2 = fwd.forward(q, k, v, pk, pv, gate, None, True, 0.25)
        bwd.backward(torch.empty_like(out), q, k, v, pk, pv, gate, None, out, lse1, lse2, True, 0.25)
    assert [launch.kernel for launch in launches] == ["forward", "backward_prefix", "backward"]
    for launch in launches:
        grid = launch.grid({"BLOCK_M": 16, "BLOCK_N": 16})
        assert len(grid) == 1 and B * H <= grid[0] < 2**31, (launch.kernel, grid)


def test_fitting_keeps_what_fits_in_order():
    sizes = {"a": 200_000, "b": 100_000, "c": 232_448, "d": 232_449}
    assert fitting("forward", list(sizes), sizes.get, 232_448) == ["a", "b", "c"]
    assert fitting("forward", list(sizes), sizes.get, 166_912) == ["b"]
    with pytest.raises(ValueError, match="no configuration of the forward kernel fits"):
        fitting("forward", list(sizes), sizes.get, 50_000)


def test_candidate_lists():
    """Every kernel has candidates for each element size and head-dim block; the dQ
    candidates of a key share BLOCK_M (its partials are allocated before the launch);
    blocks are powers of two of at least 16, as tl.dot needs."""
    for kernel, table in CANDIDATES.items():
        # The fused backward's kernels serve head dims up to 128 (the deterministic one above).
        dims = (64, 96, 128) if kernel in configs.FUSED_BACKWARD else (64, 96, 128, 256)
        assert set(table) == {(e, d) for e in (2, 4) for d in dims}, kernel
        for (elem, d), specs in table.items():
            assert specs, (kernel, elem, d)
            for m, n, warps, stages in specs:
                for block in (m, n):
                    assert block >= 16 and block & (block - 1) == 0
                assert warps in (4, 8) and 1 <= stages <= 4
            if kernel in ("backward_dq", "backward_prefix"):
                assert len({m for m, *_ in specs}) == 1, (kernel, elem, d)
    # Without the interpreter the dQ slots follow the first candidate's BLOCK_M.
    if not torch.cuda.is_available() and not configs.INTERPRET:
        assert dq_block_m(128, 2) == CANDIDATES["backward_dq"][(2, 128)][0][0]


@pytest.mark.interpreter
def test_the_interpreters_dq_block_is_its_own():
    assert dq_block_m(128, 2) == configs.INTERPRETER_BLOCKS["backward_dq"]["BLOCK_M"] == 16


@pytest.mark.interpreter
def test_packed_offsets_past_2_31_elements():
    """A packed sequence whose first row times the row stride passes 2**31 (q a view into a
    large buffer): its start offset is computed in 64 bits, and every result equals the one
    on compact copies."""
    from llama_adapter_fast import gated_prefix_attention_varlen

    T, D = 5, 16
    stride = 2**29 + 64
    storage = _sparse(T * stride, torch.float16)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = [], [], [], []
    for i, out in enumerate((q, k, v, grad_out)):
        view = storage.as_strided((T, 1, D), (stride, D, 1), storage_offset=i * D)
        view.copy_(torch.randn(T, 1, D, generator=g).half())
        out.append(view)
    (q,), (k,), (v,), (grad_out,) = q, k, v, grad_out
    cu = torch.tensor([0, 1, 4, 5], dtype=torch.int32)  # the last sequence starts at row 4
    assert 4 * q.stride(0) > 2**31
    pk, pv = torch.randn(2, 3, 1, 3, D, generator=g).half()
    gate = torch.tensor([0.7])

    def run(q, k, v, grad_out):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, pk, pv, gate)]
        out = gated_prefix_attention_varlen(*leaves[:3], cu, cu, 3, 3, *leaves[3:], backend="triton")
        return [out, *torch.autograd.grad(out, leaves, grad_out)]

    with expect_launches("forward", "backward_prefix", "backward"):
        strided = run(q, k, v, grad_out)
    compact = run(q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous())
    for name, a, b in zip(("out", *GRAD_NAMES), strided, compact, strict=True):
        assert torch.equal(a, b), name
        assert torch.isfinite(a).all(), name
