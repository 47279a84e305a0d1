"""Adding the adapter to a transformers model, removing it, and saving and loading it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from torch import nn

from llama_adapter_fast.integrations.transformers.attention import (
    ADAPTER_PARAMETER_NAMES,
    ATTENTION_NAME,
    GATE_NAME,
    PROMPT_NAME,
    attention_layout,
    register_attention,
)
from llama_adapter_fast.integrations.transformers.tuning import (
    TUNED_NAMES,
    add_tuning,
    norm_parameter_names,
    remove_tuning,
    tuned_shapes,
    tuning_plan,
)
from llama_adapter_fast.ops import BACKENDS, GATE_ACTIVATIONS

_METADATA_KEY = "llama_adapter_fast"


def _layer_stacks(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """The self-attention modules of each stack of layers (the decoder of a causal LM, the
    encoder of BERT or ViT, each tower of CLIP), bottom to top, with their names, keyed by
    the name of the ModuleList that holds the stack."""
    modules = dict(model.named_modules())
    stacks: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in modules.items():
        if attention_layout(module) is None:
            continue
        parts = name.split(".")
        parents = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        stack = next((p for p in parents if isinstance(modules.get(p), nn.ModuleList)), "")
        stacks.setdefault(stack, []).append((name, module))
    return stacks


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for stack in _layer_stacks(model).values() for _, m in stack]


def _adapted_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in _attention_modules(model) if isinstance(getattr(m, PROMPT_NAME, None), nn.Parameter)]


def _configs(model: nn.Module) -> list:
    """The model's config and its sub-configs (a CLIP's text and vision configs)."""
    subs = [getattr(model.config, k, None) for k in ("text_config", "vision_config")]
    return [model.config, *(c for c in subs if c is not None)]


def _refuse_what_the_op_does_not_compute(model: nn.Module, stacks: dict) -> None:
    """Models whose attention holds a part the op lacks, refused before anything changes."""
    for config in _configs(model):
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError(f"model: {type(model).__name__} caps its attention logits (config."
                             f"attn_logit_softcapping = {config.attn_logit_softcapping}), which the fused op does "
                             "not compute")
    for attentions in stacks.values():
        for name, module in attentions:
            if getattr(module, "attn_logit_softcapping", None) is not None:
                raise ValueError(f"model: {name} caps its attention logits (attn_logit_softcapping = "
                                 f"{module.attn_logit_softcapping}), which the fused op does not compute")
            if isinstance(getattr(module, "sinks", None), torch.Tensor):
                raise ValueError(f"model: {name} has attention sinks, which the fused op does not compute")
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if len(stacks) == 1 and isinstance(n_layers, int) and len(next(iter(stacks.values()))) < n_layers:
        stack, attentions = next(iter(stacks.items()))
        raise ValueError(f"model: {type(model).__name__} shares one layer across its depths ({len(attentions)} "
                         f"attention module(s) in {stack or 'the model'} run at {n_layers} depths, as ALBERT's "
                         "do): an adapter on a shared layer would adapt every depth it runs at, not the top ones; "
                         "not supported")


def _plan(model: nn.Module, adapter_len: int, adapter_layers: int, per_head_gate: bool) -> list:
    """(name, module, prompt shape, gate shape) of every attention module to adapt: the top
    `adapter_layers` of each stack. Checks the model and the settings; changes nothing."""
    if _adapted_modules(model):
        raise ValueError("model already has adaption prompts: call remove_llama_adapter first")
    stacks = _layer_stacks(model)
    if not stacks:
        raise ValueError(
            "model has no self-attention modules with query, key and value projections "
            "(q_proj, k_proj, v_proj and head_dim, or query, key, value and attention_head_size)"
        )
    _refuse_what_the_op_does_not_compute(model, stacks)
    for stack, attentions in stacks.items():
        if adapter_layers > len(attentions):
            raise ValueError(
                f"adapter_layers ({adapter_layers}) is more than the {len(attentions)} layers of {stack or 'the model'}"
            )
    plan = []
    for name, module in (entry for attentions in stacks.values() for entry in attentions[-adapter_layers:]):
        query_name, key_name, _, head_name = attention_layout(module)
        num_heads = getattr(module, query_name).out_features // getattr(module, head_name)
        plan.append((name, module, (adapter_len, getattr(module, key_name).in_features),
                     (num_heads if per_head_gate else 1,)))
    return plan


def _head_parameter_names(model: nn.Module) -> list[str]:
    """The task head's parameters: those outside the backbone that transformers puts the head
    on (``model.base_model``), weights tied to the backbone (an LM head's) excluded."""
    base = getattr(model, "base_model", model)
    if base is model:
        return []
    backbone = {id(p) for p in base.parameters()}
    return [name for name, p in model.named_parameters() if id(p) not in backbone]


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:  # transformers before set_attn_implementation existed
        model.config._attn_implementation = name


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value


def add_llama_adapter(
    model: nn.Module,
    adapter_len: int = 10,
    adapter_layers: int = 30,
    gate_activation: str = "tanh",
    per_head_gate: bool = True,
    *,
    train_head: bool = False,
    backend: str = "auto",
    bias_tuning: str | Sequence[str] = (),
    scale_tuning: str = "output",
    norm_tuning: bool = False,
) -> nn.Module:
    """Turn a transformers model into a LLaMA-Adapter, in place.

    In each stack of layers (the decoder of a causal LM; the encoder of ViT, BERT or
    RoBERTa; each of CLIP's two towers) the top `adapter_layers` self-attention modules
    get ``adaption_prompt`` (adapter_len, hidden_size), drawn from N(0, 1) as in the paper,
    and ``adaption_gate``, zeros of shape (num_heads,) with `per_head_gate` or (1,)
    without, both float32 parameters of the attention module. Their prompts pass through
    the layer's frozen key and value projections (no rotary embedding) into prefix keys
    and values that every query attends to with a softmax of its own, scaled by act(gate).
    Word attention stays what the model's is: causal in decoders and CLIP's text tower,
    bidirectional in encoders and CLIP's vision tower, with padding as key padding. Every
    other parameter is frozen (the task head too, unless `train_head`), and the model
    switches to the ``"llama_adapter_fast"`` attention implementation, so padding masks and
    transformers' caches work as before and ``generate()`` works. With zero gates the
    outputs are the base model's.

    Args:
        model: a transformers model whose attention goes through transformers' attention
            interface, with self-attention modules laid out as in Llama (q_proj, k_proj,
            v_proj, head_dim: Llama, Mistral, Qwen2, ViT, CLIP) or BERT (query, key, value,
            attention_head_size: BERT, RoBERTa).
        adapter_len: prompt tokens per layer (P).
        adapter_layers: how many layers of each stack, counted from the top, get a prompt.
        gate_activation: "tanh" (the paper's zero-init attention) or "identity".
        per_head_gate: one gate per query head (True) or one per layer.
        train_head: also train the task head: the parameters outside ``model.base_model``
            (the classifier of ViTForImageClassification or RobertaForSequenceClassification);
            they are then saved with the adapter. A model without a head raises ValueError.
        backend: the op's backend in adapted layers ("auto": the Triton kernels for CUDA
            tensors, two SDPA calls otherwise).
        bias_tuning: LLaMA-Adapter V2: the linear layers of every layer, by name (q_proj,
            o_proj, gate_proj, ... or the output embeddings' lm_head; "all" for every one),
            that take a zero-initialized bias and, unless `scale_tuning` is "none", a
            one-initialized scale (see integrations/transformers/tuning.py).
        scale_tuning: where the scale sits: "output" (s * (W x + b), the paper), "input"
            (W (s * x) + b, the original 65B release) or "none".
        norm_tuning: LLaMA-Adapter V2: the norms' weights (and LayerNorm biases) train too.

    Returns:
        The same model. `model.llama_adapter_config` holds the settings.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    adapter_len = _check_int("adapter_len", adapter_len, 1)
    adapter_layers = _check_int("adapter_layers", adapter_layers, 1)
    if gate_activation not in GATE_ACTIVATIONS:
        raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {gate_activation!r}")
    for name, flag in (("per_head_gate", per_head_gate), ("train_head", train_head), ("norm_tuning", norm_tuning)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not getattr(model, "_supports_attention_backend", True):
        raise TypeError(
            f"model: {type(model).__name__} does not route its attention through transformers' attention "
            "interface (its _supports_attention_backend is False)"
        )
    plan = _plan(model, adapter_len, adapter_layers, per_head_gate)
    tuned = tuning_plan(model, list(_layer_stacks(model)), bias_tuning, scale_tuning) if bias_tuning else []
    norms = norm_parameter_names(model) if norm_tuning else []
    head = _head_parameter_names(model) if train_head else []
    if train_head and not head:
        raise ValueError(f"train_head: {type(model).__name__} has no task head on top of its base model")

    previous = model.config._attn_implementation
    register_attention()
    _set_attn_implementation(model, ATTENTION_NAME)
    for _, module, prompt_shape, gate_shape in plan:
        weight = next(module.parameters())
        prompt = torch.empty(prompt_shape, device=weight.device, dtype=torch.float32)
        gate = torch.zeros(gate_shape, device=weight.device, dtype=torch.float32)
        module.register_parameter(PROMPT_NAME, nn.Parameter(prompt.normal_()))
        module.register_parameter(GATE_NAME, nn.Parameter(gate))
        # Plain attributes, read by the attention function.
        module.adaption_gate_activation = gate_activation
        module.adaption_backend = backend
    add_tuning(tuned, scale_tuning)
    trained = set(head) | set(norms)
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[-1] in (*ADAPTER_PARAMETER_NAMES, *TUNED_NAMES) or name in trained)
    model.llama_adapter_config = {
        "adapter_len": adapter_len,
        "adapter_layers": adapter_layers,
        "gate_activation": gate_activation,
        "per_head_gate": per_head_gate,
        "train_head": train_head,
        "head_parameters": head,
        "bias_tuning": bias_tuning if isinstance(bias_tuning, str) else list(bias_tuning),
        "scale_tuning": scale_tuning,
        "norm_tuning": norm_tuning,
        "norm_parameters": norms,
        "previous_attn_implementation": previous,
    }
    return model


def remove_llama_adapter(model: nn.Module) -> nn.Module:
    """Undo `add_llama_adapter`: drop the prompts and gates and restore the attention
    implementation the model had. Every parameter stays frozen (a trained head too)."""
    config = getattr(model, "llama_adapter_config", None)
    if config is None:
        raise ValueError("model has no adapter added by add_llama_adapter")
    for module in _adapted_modules(model):
        for name in (*ADAPTER_PARAMETER_NAMES, "adaption_gate_activation", "adaption_backend"):
            delattr(module, name)
    remove_tuning(model)
    model.requires_grad_(False)
    _set_attn_implementation(model, config["previous_attn_implementation"])
    del model.llama_adapter_config
    return model


# The settings saved with an adapter, with the defaults of files saved before a setting existed.
_SETTINGS = {"adapter_len": None, "adapter_layers": None, "gate_activation": None, "per_head_gate": None,
             "train_head": False, "bias_tuning": [], "scale_tuning": "output", "norm_tuning": False}


def llama_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors alone (prompts and gates, V2's biases, scales and norms where
    they are tuned, and the task head where it is trained), keyed as in model.state_dict()."""
    config = getattr(model, "llama_adapter_config", {})
    extra = set(config.get("head_parameters", ())) | set(config.get("norm_parameters", ()))
    return {
        name: tensor for name, tensor in model.state_dict().items()
        if name.rsplit(".", 1)[-1] in (*ADAPTER_PARAMETER_NAMES, *TUNED_NAMES) or name in extra
    }


def save_llama_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Save the adapter's tensors (with the task head where it is trained) and settings to
    one safetensors file."""
    from safetensors.torch import save_file

    config = getattr(model, "llama_adapter_config", None)
    if config is None:
        raise ValueError("model has no adapter added by add_llama_adapter")
    settings = {k: config[k] for k in _SETTINGS}
    tensors = {name: t.detach().contiguous().cpu() for name, t in llama_adapter_state_dict(model).items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt", _METADATA_KEY: json.dumps(settings)})


def load_llama_adapter(model: nn.Module, path: str | os.PathLike, *, backend: str = "auto") -> nn.Module:
    """Load an adapter saved by `save_llama_adapter` (and the task head saved with it) into
    `model`, adding the adapter first (with the saved settings) where the model has none.
    Everything is checked before the model changes: a file that does not fit the model is a
    ValueError and leaves the model as it was. Returns the model."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # missing, truncated, not safetensors: each fails its own way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"path: {os.fspath(path)!r} cannot be read as a safetensors adapter ({reason})") from None
    if _METADATA_KEY not in metadata:
        raise ValueError(f"path: {os.fspath(path)!r} is not an adapter saved by save_llama_adapter")
    settings = {**_SETTINGS, **json.loads(metadata[_METADATA_KEY])}
    config = getattr(model, "llama_adapter_config", None)
    if config is None:  # the shapes adding the adapter would give
        plan = _plan(model, settings["adapter_len"], settings["adapter_layers"], settings["per_head_gate"])
        expected = {f"{name}.{PROMPT_NAME}": prompt for name, _, prompt, _ in plan}
        expected |= {f"{name}.{GATE_NAME}": gate for name, _, _, gate in plan}
        params = dict(model.named_parameters())
        expected |= {n: params[n].shape for n in (_head_parameter_names(model) if settings["train_head"] else [])}
        if settings["bias_tuning"]:
            tuned = tuning_plan(model, list(_layer_stacks(model)), settings["bias_tuning"], settings["scale_tuning"])
            expected |= tuned_shapes(tuned, settings["scale_tuning"])
        expected |= {n: params[n].shape for n in (norm_parameter_names(model) if settings["norm_tuning"] else [])}
    elif any(config[k] != v for k, v in settings.items()):
        raise ValueError(f"the model's adapter settings differ from the saved ones: {settings}")
    else:
        expected = {name: t.shape for name, t in llama_adapter_state_dict(model).items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter tensors do not match the model: missing {missing}, unexpected {unexpected}")
    for name, shape in expected.items():
        if tuple(shape) != tuple(tensors[name].shape):
            raise ValueError(f"{name}: saved shape {tuple(tensors[name].shape)}, the model has {tuple(shape)}")
    if config is None:
        add_llama_adapter(model, **settings, backend=backend)
    with torch.no_grad():
        for name, tensor in llama_adapter_state_dict(model).items():
            tensor.copy_(tensors[name])
    return model
