"""Smoke tests of the examples: a few steps on a handful of examples each, through the
fused op (the full runs take about a minute each and stay out of the suite)."""

import pytest
import torch

pytest.importorskip("transformers")

from examples import roberta_sentence_classification, vit_image_classification  # noqa: E402

TINY = ["--pretrain-steps", "2", "--steps", "2", "--batch-size", "8", "--train-size", "16", "--test-size", "8",
        "--adapter-layers", "2", "--backend", "sdpa", "--threads", str(torch.get_num_threads())]


@pytest.mark.parametrize("example, padded", [(vit_image_classification, False),
                                             (roberta_sentence_classification, True)])
def test_example_runs_through_the_fused_op(example, padded, op_calls, capsys):
    result = example.main(TINY)
    assert result.keys() == {"before", "after"} and all(0 <= a <= 1 for a in result.values())
    out = capsys.readouterr().out
    assert "before fine-tuning" in out and "after fine-tuning" in out
    # two adapted layers in every forward: the accuracy before, two steps, the accuracy after
    assert len(op_calls) == 2 * 4 and set(op_calls) == {"sdpa"}
    assert all(not kw["causal"] and (kw.get("key_padding_mask") is not None) == padded for kw in op_calls.kwargs)


@pytest.mark.parametrize("example", [vit_image_classification, roberta_sentence_classification])
def test_bad_options_exit_with_status_2(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--steps", "0"])
    assert exit_info.value.code == 2
    assert "error: --steps must be at least 1" in capsys.readouterr().err
