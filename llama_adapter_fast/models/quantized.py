"""A frozen base in 4 or 8 bits: the model's linear layers quantized by bitsandbytes or torchao.

LLaMA-Adapter trains about a million parameters over a frozen base of billions, so the base
is where the memory goes. `quantize_linears` replaces every linear layer of the transformer
blocks (wq, wk, wv, wo, w1, w2, w3) by a quantized one:

- "nf4" and "fp4": bitsandbytes' `Linear4bit` (QLoRA's 4-bit NormalFloat or 4-bit float,
  blocks of 64 weights with a nested-quantized absmax), 0.52 bytes per weight;
- "int8": bitsandbytes' `Linear8bitLt` (LLM.int8(): row-wise int8 with the outlier threshold
  6.0 that transformers uses), 1 byte per weight plus a float per row;
- "torchao-int8": torchao's int8 weight-only quantization (`Int8WeightOnlyConfig`: row-wise
  int8 weights, activations in the compute dtype, the weight a tensor subclass), 1 byte per
  weight plus a float and a zero point per row.

What stays in the compute dtype: the embedding, the output head (transformers also leaves
`lm_head` unquantized, and SmolLM-style models tie it to the embedding), the norms, and all
that trains (prompts, gates, V2's biases and scales). The prefix keys and values still come
from the frozen wk and wv, now their quantized forms, once per layer and forward.

V2's scale cannot be folded into a quantized weight as `tuning.tuned_linear` folds it into a
float one (re-quantizing at every step would change the base), so the quantized tuned layers
apply it beside the product: s * (W x + b) or W (s x) + b, in the same parameter names, so
that an adapter file loads onto a quantized or a full base alike.

The layers quantize where they are placed: bitsandbytes on the move to a CUDA device (the
full-precision weight never reaches it) or by its CPU backend, torchao where the weight is.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from llama_adapter_fast.models.tuning import TunedLinear

QUANTIZATIONS = ("nf4", "fp4", "int8", "torchao-int8")
# The library each quantization needs (all in the [quant] extra).
BACKENDS = {"nf4": "bitsandbytes", "fp4": "bitsandbytes", "int8": "bitsandbytes", "torchao-int8": "torchao"}
# The outlier threshold of LLM.int8() (transformers' BitsAndBytesConfig default).
INT8_THRESHOLD = 6.0


def quantization_problem(method: str) -> str | None:
    """Why `method`'s library cannot be used here, or None."""
    library = BACKENDS[method]
    if importlib.util.find_spec(library) is None:
        return f"{library} is not installed (pip install 'llama-adapter-fast[quant]')"
    return None


def check_quantization(method: str | None, device: torch.device | str | None = None) -> None:
    """A ValueError naming `quantize` unless `method` is None or one this machine can run on
    `device`: a one-row product through the quantized layer is tried there."""
    if method is None:
        return
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {method!r}")
    problem = quantization_problem(method)
    if problem is not None:
        raise ValueError(f"quantize={method!r} needs {BACKENDS[method]}: {problem}")
    device = torch.device(device if device is not None else "cpu")
    probe = nn.Linear(64, 64, bias=False)
    try:
        with torch.no_grad():
            quantized_linear(probe, method, torch.float32, device)(torch.ones(1, 64, device=device))
    except Exception as error:  # the library's own message says what its backend lacks
        raise ValueError(f"quantize={method!r} cannot run on {device}: {BACKENDS[method]} says "
                         f"{type(error).__name__}: {error}") from None


class _Tuning:
    """V2's bias and scale beside a quantized product (see the module docstring)."""

    placement: str
    tuned_bias: nn.Parameter
    tuned_scale: nn.Parameter | None

    def reset_tuning(self) -> None:
        TunedLinear.reset_tuning(self)  # the same fields, the same start: zeros and ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "input":
            x = x * self.tuned_scale.to(x.dtype)
        y = super().forward(x) + self.tuned_bias.to(x.dtype)
        return y * self.tuned_scale.to(y.dtype) if self.placement == "output" else y


def _bitsandbytes_classes() -> dict:
    import bitsandbytes as bnb

    class Linear4bit(bnb.nn.Linear4bit):
        """bitsandbytes' 4-bit layer, made from a float weight without a random init."""

    class Linear8bit(bnb.nn.Linear8bitLt):
        """bitsandbytes' int8 layer; `compute_dtype` as the 4-bit layer names it."""

    class TunedLinear4bit(_Tuning, Linear4bit):
        pass

    class TunedLinear8bit(_Tuning, Linear8bit):
        pass

    return {("4bit", False): Linear4bit, ("4bit", True): TunedLinear4bit,
            ("int8", False): Linear8bit, ("int8", True): TunedLinear8bit}


class _TorchaoLinear(nn.Linear):
    """A linear layer whose weight is torchao's int8 weight-only tensor."""


class _TunedTorchaoLinear(_Tuning, _TorchaoLinear):
    pass


# The quantized layer classes by (kind, tuned); bitsandbytes' made on first use.
_CLASSES: dict = {("torchao", False): _TorchaoLinear, ("torchao", True): _TunedTorchaoLinear}


def _layer_class(method: str, tuned: bool) -> type[nn.Module]:
    kind = {"int8": "int8", "torchao-int8": "torchao"}.get(method, "4bit")
    if (kind, tuned) not in _CLASSES:
        classes = _bitsandbytes_classes()
        for cls in classes.values():
            cls.__qualname__ = cls.__name__
        _CLASSES.update(classes)
    return _CLASSES[(kind, tuned)]


def quantized_linear(linear: nn.Linear, method: str, compute_dtype: torch.dtype,
                     device: torch.device | str) -> nn.Module:
    """`linear`'s weight quantized on `device` by `method` (see QUANTIZATIONS), computing in
    `compute_dtype`; a `TunedLinear` keeps its tuned bias and scale (same names, float32)."""
    tuned = isinstance(linear, TunedLinear)
    cls = _layer_class(method, tuned)
    weight = linear.weight.detach().to(compute_dtype)
    shape = (linear.in_features, linear.out_features)
    with torch.device("meta"):  # no random init: the weight comes next
        if method == "int8":
            layer = cls(*shape, bias=False, has_fp16_weights=False, threshold=INT8_THRESHOLD)
        elif method == "torchao-int8":
            layer = cls(*shape, bias=False)
        else:
            layer = cls(*shape, bias=False, compute_dtype=compute_dtype, quant_type=method)
    layer.compute_dtype = compute_dtype
    if method == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        layer.weight = nn.Parameter(weight.to(device), requires_grad=False)
        quantize_(layer, Int8WeightOnlyConfig())
    else:
        import bitsandbytes as bnb

        if method == "int8":
            layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type=method, module=layer)
        layer.weight = layer.weight.to(device)  # bitsandbytes quantizes on this move
    if tuned:
        layer.placement = linear.placement
        layer.tuned_bias = nn.Parameter(linear.tuned_bias.detach().to(device), requires_grad=False)
        scale = linear.tuned_scale
        layer.tuned_scale = None if scale is None else nn.Parameter(scale.detach().to(device), requires_grad=False)
    return layer


def quantize_linears(model: nn.Module, method: str, device: torch.device | str | None = None) -> None:
    """Replace the linear layers of `model.layers` (a LLaMAAdapter's blocks) by quantized
    ones on `device` (default: where the model is), in the embedding's dtype, and move the
    rest of the model there. The trainable parameters keep their requires_grad."""
    check_quantization(method, device)
    embedding = model.tok_embeddings.weight
    device = torch.device(device) if device is not None else embedding.device
    for block in model.layers:
        for owner in (block.attention, block.feed_forward):
            for name, child in list(owner.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(owner, name, quantized_linear(child, method, embedding.dtype, device))
    model.to(device)
    model.freeze_base()


def is_quantized(model: nn.Module) -> bool:
    """Whether `model`'s base has quantized linear layers (this module's)."""
    classes = tuple(_CLASSES.values())
    return any(isinstance(m, classes) for m in model.modules())


def num_parameters(module: nn.Module) -> int:
    """Parameters of `module`, a 4-bit weight counted by its shape (it packs two per byte)."""
    def count(p: torch.Tensor) -> int:
        state = getattr(p, "quant_state", None)
        return state.shape.numel() if state is not None else p.numel()

    return sum(count(p) for p in module.parameters())


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's) counts the tensors it is made of."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes that `module`'s parameters and buffers hold, quantization statistics included
    (4-bit absmax and its nested code, int8 row scales): the model's memory footprint."""
    total = sum(_tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))
    for m in module.modules():
        weight = getattr(m, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
            total += sum(t.numel() * t.element_size() for t in tensors)
        scb = getattr(weight, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


__all__ = ["QUANTIZATIONS", "check_quantization", "quantize_linears", "quantized_linear", "is_quantized",
           "num_parameters", "weight_bytes", "quantization_problem"]
