"""LLaMA-Adapter V2's bias, scale and norm tuning on a transformers model (see
llama_adapter_fast/models/tuning.py for the arithmetic and the fused linear layer).

The chosen ``nn.Linear`` modules of every layer (by their names in the module tree:
q_proj, o_proj, gate_proj, ... for Llama; query, dense, ... for BERT) take the class
`TunedLinear`, which adds ``tuned_bias`` (zeros) and ``tuned_scale`` (ones) to the layer's
own weight and bias: y = s * (W x + b0 + b) ("output"), W (s * x) + b0 + b ("input") or
W x + b0 + b ("none"). With norm tuning the norms' weights (and LayerNorm biases) train.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llama_adapter_fast.models.tuning import SCALE_PLACEMENTS, tuned_linear

TUNED_NAMES = ("tuned_bias", "tuned_scale")


class TunedLinear(nn.Linear):
    """The class a tuned ``nn.Linear`` of a transformers model takes (its own parameters kept)."""

    tuned_placement: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.tuned_bias if self.bias is None else self.tuned_bias + self.bias
        return tuned_linear(x, self.weight, bias, getattr(self, "tuned_scale", None), self.tuned_placement)


def _candidates(model: nn.Module, stacks: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The linear layers inside the layer stacks, and the output embeddings (an LM head)."""
    found = [(n, m) for n, m in model.named_modules() if any(n.startswith(f"{s}.") for s in stacks if s)
             and isinstance(m, nn.Linear)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        found += [(n, m) for n, m in model.named_modules() if m is head]
    return found


def tuning_plan(model: nn.Module, stacks: Sequence[str], bias_tuning: str | Sequence[str],
                scale_tuning: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear layer to tune; checks the settings, changes nothing.
    `bias_tuning`: "all", or the layers' last names (q_proj, o_proj, lm_head, ...)."""
    if scale_tuning not in SCALE_PLACEMENTS:
        raise ValueError(f"scale_tuning must be one of {SCALE_PLACEMENTS}, got {scale_tuning!r}")
    if isinstance(bias_tuning, str) and bias_tuning != "all":
        raise ValueError(f"bias_tuning must be 'all' or a sequence of linear layer names, got {bias_tuning!r}")
    if not isinstance(bias_tuning, str) and not all(isinstance(n, str) for n in bias_tuning):
        raise TypeError(f"bias_tuning must be 'all' or a sequence of linear layer names, got {bias_tuning!r}")
    candidates = _candidates(model, stacks)
    if bias_tuning == "all":
        plan = candidates
    else:
        names = {n.rsplit(".", 1)[-1] for n, _ in candidates}
        unknown = sorted(set(bias_tuning) - names)
        if unknown:
            raise ValueError(f"bias_tuning: no linear layers named {unknown} in the model's layers (it has "
                             f"{sorted(names)})")
        plan = [(n, m) for n, m in candidates if n.rsplit(".", 1)[-1] in bias_tuning]
    for name, module in plan:
        if type(module) is not nn.Linear:
            raise TypeError(f"bias_tuning: {name} is a {type(module).__name__}, not a torch.nn.Linear (a quantized "
                            f"or wrapped layer): not supported")
    return plan


def tuned_shapes(plan: Sequence[tuple[str, nn.Module]], scale_tuning: str) -> dict[str, tuple[int, ...]]:
    """The tuned tensors the plan adds, with their shapes."""
    shapes = {}
    for name, module in plan:
        shapes[f"{name}.tuned_bias"] = (module.out_features,)
        if scale_tuning != "none":
            shapes[f"{name}.tuned_scale"] = (module.out_features if scale_tuning == "output" else module.in_features,)
    return shapes


def norm_parameter_names(model: nn.Module) -> list[str]:
    """The norms' parameters (RMSNorm weights, LayerNorm weights and biases) of the base model."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
            names += [f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)]
    return names


def add_tuning(plan: Sequence[tuple[str, nn.Module]], scale_tuning: str) -> None:
    for _, module in plan:
        weight = module.weight
        module.__class__ = TunedLinear
        module.tuned_placement = scale_tuning
        module.register_parameter("tuned_bias", nn.Parameter(
            torch.zeros(module.out_features, device=weight.device, dtype=torch.float32)))
        if scale_tuning != "none":
            size = module.out_features if scale_tuning == "output" else module.in_features
            module.register_parameter("tuned_scale", nn.Parameter(
                torch.ones(size, device=weight.device, dtype=torch.float32)))


def remove_tuning(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is TunedLinear:
            for name in TUNED_NAMES:
                if hasattr(module, name):
                    delattr(module, name)
            del module.tuned_placement
            module.__class__ = nn.Linear
