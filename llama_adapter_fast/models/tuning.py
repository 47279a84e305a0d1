"""LLaMA-Adapter V2's bias and scale tuning of the frozen linear layers (Gao et al., 2023).

Each tuned linear layer y = W x gets a learnable bias b (zero at start) and scale s (one at
start), so that step 0 is exactly the base model. Where the scale sits:

- "output" (the paper, litgpt's adapter_v2): y = s * (W x + b), s of size out_features;
- "input" (the original 65B chat release): y = W (s * x) + b, s of size in_features;
- "none" (the original 7B release): y = W x + b.

`tuned_linear` computes each with one matrix product and no second pass over the
activations: the scale is folded into the frozen weight (a pass over the weight, which
training never updates) and the bias into the product's epilogue (addmm). Its backward
reads what the product's own backward computes: for "output", ds = sum_t dy * y / s; for
"input", ds = sum_t x * dx / s (dx = dy W s, the input gradient the layer returns anyway);
the few entries whose scale is exactly 0 are recomputed from their own row or column.
`tuned_linear_reference` is the eager equation, the oracle of the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCALE_PLACEMENTS = ("output", "input", "none")
# The linear layers of the one-file model that can take a bias and a scale.
TUNABLE_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


def tuned_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           scale: torch.Tensor | None, placement: str) -> torch.Tensor:
    """The paper's equation, eagerly: s * (W x + b), W (s * x) + b, or W x + b."""
    if placement == "output":
        return scale * (x @ weight.T + bias)
    if placement == "input":
        return (scale * x) @ weight.T + bias
    return x @ weight.T + bias


def _rows_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).sum(0)


class _TunedLinear(torch.autograd.Function):
    """y = s * (W x + b) or W (s * x) + b with W frozen; gradients for x, b and s."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, placement):
        s = scale.to(weight.dtype)
        if placement == "output":
            folded = weight * s[:, None]
            y = F.linear(x, folded, bias.to(weight.dtype) * s)
        else:
            folded = weight * s
            y = F.linear(x, folded, bias.to(weight.dtype))
        ctx.placement = placement
        ctx.save_for_backward(x, weight, bias, scale, y if placement == "output" else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, y = ctx.saved_tensors
        s = scale.to(weight.dtype)
        acc = torch.promote_types(dy.dtype, torch.float32)
        zero = (scale == 0).nonzero().flatten()
        safe = scale.to(acc).masked_fill(scale == 0, 1)
        if ctx.placement == "output":
            dx = dy @ (weight * s[:, None])
            dbias = _rows_sum(dy.to(acc)) * scale.to(acc)
            # y = s (W x + b): where s is 0, W x + b comes from those rows of the weight.
            dscale = _rows_sum(dy.to(acc) * (y.to(acc) / safe))
            if zero.numel():
                y0 = x.to(acc) @ weight[zero].to(acc).T + bias[zero].to(acc)
                dscale[zero] = _rows_sum(dy[..., zero].to(acc) * y0)
        else:
            # y = W (s x) + b: dx = (dy W) s, and ds = sum_t x (dy W) = sum_t x dx / s.
            dx = dy @ (weight * s)
            dbias = _rows_sum(dy.to(acc))
            dscale = _rows_sum(x.to(acc) * dx.to(acc)) / safe
            if zero.numel():
                dscale[zero] = _rows_sum(x[..., zero].to(acc) * (dy.to(acc) @ weight[:, zero].to(acc)))
        dx = dx if ctx.needs_input_grad[0] else None
        return dx, None, dbias.to(bias.dtype), dscale.to(scale.dtype), None


def tuned_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
                 placement: str) -> torch.Tensor:
    """A frozen linear layer with V2's bias and scale (see the module docstring)."""
    if placement == "none":
        return F.linear(x, weight, bias.to(weight.dtype))
    return _TunedLinear.apply(x, weight, bias, scale, placement)


class TunedLinear(nn.Linear):
    """An ``nn.Linear`` without a bias of its own, plus V2's ``tuned_bias`` (zeros) and, unless
    the placement is "none", ``tuned_scale`` (ones), both float32 whatever the weight's dtype."""

    def __init__(self, in_features: int, out_features: int, placement: str = "output", **kwargs) -> None:
        if placement not in SCALE_PLACEMENTS:
            raise ValueError(f"placement must be one of {SCALE_PLACEMENTS}, got {placement!r}")
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self.placement = placement
        device = kwargs.get("device")
        self.tuned_bias = nn.Parameter(torch.zeros(out_features, dtype=torch.float32, device=device))
        if placement != "none":
            size = out_features if placement == "output" else in_features
            self.tuned_scale = nn.Parameter(torch.ones(size, dtype=torch.float32, device=device))
        else:
            self.tuned_scale = None

    def reset_tuning(self) -> None:
        with torch.no_grad():
            self.tuned_bias.zero_()
            if self.tuned_scale is not None:
                self.tuned_scale.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tuned_linear(x, self.weight, self.tuned_bias, self.tuned_scale, self.placement)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tuned bias and {self.placement} scale"
