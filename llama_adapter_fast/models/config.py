"""`ModelArgs`: the hyper-parameters of the LLaMA with LLaMA-Adapter, with the field names
of Meta's params.json, and the fields that describe the adapter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from llama_adapter_fast.models.tuning import SCALE_PLACEMENTS, TUNABLE_LINEARS, TunedLinear
from llama_adapter_fast.ops import BACKENDS, GATE_ACTIVATIONS

ADAPTER_FORMAT = "llama_adapter_fast.adapter/1"
# The fields of ModelArgs that describe the adapter rather than the base model.
ADAPTER_FIELDS = ("adapter_len", "adapter_layers", "gate_activation", "scalar_gate", "bias_tuning", "scale_tuning",
                  "norm_tuning", "prefix_projection")
# How the prompt becomes prefix keys and values: "own", the layer's wk and wv (the paper);
# "litgpt", litgpt's reading of the prompt's [q | k | v] projection as if it were
# interleaved per query group (its adapters need it; see integrations/litgpt.py).
PREFIX_PROJECTIONS = ("own", "litgpt")
ROPE_TYPES = ("llama3", "linear")


@dataclass
class ModelArgs:
    """Model hyper-parameters, with the field names of Meta's params.json.

    The FFN width follows Meta's rule (2/3 of 4 * dim, times ffn_dim_multiplier, rounded up
    to multiple_of) unless `hidden_dim` gives it explicitly (Hugging Face's
    intermediate_size). `rope_scaling` takes Hugging Face's dict: {"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} or
    {"rope_type": "linear", "factor"}. `adapter_layers = 0` gives the plain LLaMA.

    LLaMA-Adapter V2's tuning of the frozen base, in every layer (see models/tuning.py):
    `bias_tuning` names the linear layers (of TUNABLE_LINEARS: wq, wk, wv, wo, w1, w2, w3,
    output) that take a zero-initialized bias and, unless `scale_tuning` is "none", a
    one-initialized scale at their "output" (the paper, litgpt) or "input" (the original
    65B release); `norm_tuning` trains the RMSNorm weights. The original 7B release is
    bias_tuning=("wq", "wo", "w1", "w2", "w3"), scale_tuning="none", norm_tuning=True.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    adapter_len: int = 10
    adapter_layers: int = 30
    gate_activation: str = "tanh"
    # Beyond Meta's fields:
    scalar_gate: bool = False  # one gate per layer (PEFT's adaption prompt) instead of one per head
    bias_tuning: tuple[str, ...] = ()
    scale_tuning: str = "output"
    norm_tuning: bool = False
    prefix_projection: str = "own"
    rope_scaling: dict | None = None
    hidden_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelArgs.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ModelArgs.dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"ModelArgs.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"the head dim dim / n_heads must be even for rotary embeddings, got {self.head_dim}")
        if not 0 <= self.adapter_layers <= self.n_layers:
            # Named as the command line and the Python API both spell it: a user meets it as either.
            raise ValueError(f"adapter_layers (--adapter-layers) must be in [0, n_layers = {self.n_layers}] for "
                             f"this base, got {self.adapter_layers}")
        if self.adapter_layers > 0 and self.adapter_len < 1:
            raise ValueError(f"ModelArgs.adapter_len must be >= 1 when adapter_layers > 0, got {self.adapter_len}")
        if self.gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"ModelArgs.gate_activation must be one of {GATE_ACTIVATIONS}, "
                             f"got {self.gate_activation!r}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"ModelArgs.attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        if isinstance(self.bias_tuning, str) or not all(isinstance(n, str) for n in self.bias_tuning):
            raise TypeError(f"ModelArgs.bias_tuning must be a sequence of layer names, got {self.bias_tuning!r}")
        unknown = sorted(set(self.bias_tuning) - set(TUNABLE_LINEARS))
        if unknown:
            raise ValueError(f"ModelArgs.bias_tuning: unknown linear layers {unknown} (known: {TUNABLE_LINEARS})")
        self.bias_tuning = tuple(n for n in TUNABLE_LINEARS if n in self.bias_tuning)
        if self.scale_tuning not in SCALE_PLACEMENTS:
            raise ValueError(f"ModelArgs.scale_tuning must be one of {SCALE_PLACEMENTS}, got {self.scale_tuning!r}")
        if not isinstance(self.norm_tuning, bool):
            raise TypeError(f"ModelArgs.norm_tuning must be a bool, got {self.norm_tuning!r}")
        if self.prefix_projection not in PREFIX_PROJECTIONS:
            raise ValueError(f"ModelArgs.prefix_projection must be one of {PREFIX_PROJECTIONS}, got "
                             f"{self.prefix_projection!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def adapter_config(self) -> dict[str, Any]:
        """The adapter fields, as an adapter file records them; V2's only where the adapter
        uses them (so that a V1 adapter's file reads as before)."""
        config = {name: getattr(self, name) for name in ADAPTER_FIELDS}
        if self.prefix_projection == "own":
            del config["prefix_projection"]
        if not self.bias_tuning and not self.norm_tuning:
            for name in ("bias_tuning", "scale_tuning", "norm_tuning"):
                del config[name]
        else:
            config["bias_tuning"] = list(self.bias_tuning)  # JSON has no tuples
        return config

    def linear(self, name: str, in_features: int, out_features: int) -> nn.Linear:
        """The frozen linear layer `name` (of TUNABLE_LINEARS), with V2's bias and scale where
        bias_tuning names it."""
        if name in self.bias_tuning:
            return TunedLinear(in_features, out_features, self.scale_tuning)
        return nn.Linear(in_features, out_features, bias=False)


def _normalize_rope_scaling(scaling: Mapping[str, Any]) -> dict | None:
    if not isinstance(scaling, Mapping):
        raise TypeError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling.pop("rope_theta", None)
    if rope_type == "default":
        return None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling: rope_type must be one of {ROPE_TYPES} or 'default', got {rope_type!r}")
    needed = ("factor",) + (("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                            if rope_type == "llama3" else ())
    missing = [key for key in needed if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs the keys {missing}")
    return {"rope_type": rope_type, **scaling}
