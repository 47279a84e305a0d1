"""The kernels' structural choices (kernels/utils.py, KernelSettings) under Triton's
interpreter, each against the float64 oracle: the forward with the prefix first or after
the words, through pointers or tensor descriptors; the prefix in one block or several
(P > 64)."""

import itertools

import pytest

from llama_adapter_fast.kernels.utils import TMA_LAUNCH_COUNTS, kernel_settings
from llama_adapter_fast.ops.testing import Case, PackedCase, check_against_oracle, check_packed

pytestmark = pytest.mark.interpreter

CASES = {
    "causal_chunk_padded": Case(B=2, Hq=4, Hkv=2, T=37, S=50, D=80, P=3, mask="empty_rows"),
    "bidirectional_long_prefix": Case(B=1, Hq=2, Hkv=1, T=40, S=33, D=16, P=70, causal=False),
    "packed": PackedCase((20, 1, 45, 0, 7), Hq=2, Hkv=1, D=16, P=5),
}
SETTINGS = list(itertools.product([True, False], [False, True]))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("prefix_first, tma", SETTINGS,
                         ids=[f"{'prefix-first' if f else 'prefix-after'}-{'tma' if t else 'pointers'}"
                              for f, t in SETTINGS])
def test_forward_structures_against_the_oracle(case, prefix_first, tma):
    before = TMA_LAUNCH_COUNTS["forward"]
    with kernel_settings(prefix_first=prefix_first, tma=tma):
        chosen = CASES[case]
        check_packed(chosen) if isinstance(chosen, PackedCase) else check_against_oracle(chosen)
    assert (TMA_LAUNCH_COUNTS["forward"] > before) == tma



def test_unknown_settings_are_refused_and_change_nothing():
    from llama_adapter_fast.kernels.utils import SETTINGS

    with pytest.raises(TypeError, match="unknown setting 'persistent'"):
        with kernel_settings(prefix_first=False, persistent=True):
            pass
    assert SETTINGS.prefix_first is True
