"""Adapter files: this package's .safetensors (the prompts and gates, with the adapter's
settings in its metadata), .pt/.pth dicts and training checkpoints; other formats through
peft.py, litgpt.py and original.py (the original V1 and V2 releases).
Reading checks the settings against the tensors' shapes before anything is allocated."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llama_adapter_fast.files import atomic_write, first_line
from llama_adapter_fast.models.config import ADAPTER_FIELDS, PREFIX_PROJECTIONS
from llama_adapter_fast.models.formats.litgpt import litgpt_state, read_litgpt_adapter
from llama_adapter_fast.models.formats.original import QUERY_KEY, original_config, original_state, original_to_ours
from llama_adapter_fast.models.formats.peft import is_peft_folder, read_peft_adapter, read_peft_config
from llama_adapter_fast.models.tuning import SCALE_PLACEMENTS, TUNABLE_LINEARS
from llama_adapter_fast.ops import GATE_ACTIVATIONS

ADAPTER_FORMAT = "llama_adapter_fast.adapter/1"


def write_adapter_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any],
                       metadata: Mapping[str, str] | None = None) -> None:
    """The tensors (as float32) and the adapter's settings in a .safetensors file, written
    atomically (a temporary file in the same folder, then a rename)."""
    from safetensors.torch import save_file

    tensors = {n: t.detach().float().cpu().contiguous() for n, t in tensors.items()}
    meta = {"format": ADAPTER_FORMAT, "adapter_config": json.dumps(dict(adapter_config))}
    meta.update(metadata or {})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def with_own_names(state: Mapping[str, torch.Tensor], adapter_layers: int,
                   final_norm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`state` under this package's names (an original release's file is converted, for a
    model whose top `adapter_layers` layers are adapted). With `final_norm`, a norm-tuned
    model's own final norm, a file that tunes only the blocks' norms (the original 65B
    release) keeps it: the final norm stays the base's, as in the code that trained it."""
    state = original_to_ours(state, adapter_layers) if QUERY_KEY in state else dict(state)
    if final_norm is not None and "norm.weight" not in state and any(k.endswith("_norm.weight") for k in state):
        state["norm.weight"] = final_norm.detach()
    return state


def _check_adapter_path(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"adapter file {path} is a folder, not a file (nor a PEFT adapter folder: it holds no "
                         f"adapter_config.json)")
    if not path.is_file():
        raise ValueError(f"adapter file {path} does not exist")


def _unreadable_adapter(path: Path, exc: BaseException) -> ValueError:
    return ValueError(f"adapter file {path} cannot be read ({first_line(exc)}): an empty, truncated or corrupt file?")


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable_adapter(path, exc) from None


def _unwrap_pt(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    state = raw
    for key in ("trainable", "adapter"):  # a training checkpoint of this package
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of adapter tensors, got {type(state).__name__}")
    return state


@dataclass(frozen=True)
class AdapterSource:
    """An adapter file or folder, read once: everything the readers of it need.

    `state`: its tensors under the file's own names (an original release's included);
    `recorded`: the settings it records, `complete` when they are all of them (else its
    tensors' shapes tell the rest); `metadata`: what training recorded with it (the base,
    the step, the template, the tokenizer's SHA-256), {} for formats that record none;
    `original`: an original release's file, which records neither length nor layers."""

    path: Path
    state: dict[str, torch.Tensor]
    recorded: dict[str, Any]
    complete: bool
    metadata: dict[str, str]
    original: bool = False


def read_adapter(path: str | os.PathLike) -> AdapterSource:
    """Read an adapter source of any format this package reads (this package's .safetensors,
    a .pt/.pth dict or training checkpoint of ours, a PEFT folder, a litgpt checkpoint, an
    original V1 or V2 release), once. A missing, empty, truncated or corrupt file is a
    ValueError naming it."""
    path = Path(path)
    if is_peft_folder(path):
        return AdapterSource(path, read_peft_adapter(path), read_peft_config(path), True, {})
    _check_adapter_path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise _unreadable_adapter(path, exc) from None
        return AdapterSource(path, state, _recorded_config(meta, path), False, meta)
    return loaded_adapter(path, _load_pt(path))


def loaded_adapter(path: Path, raw: Any) -> AdapterSource:
    """The adapter source of a .pt/.pth file that torch.load has read as `raw`."""
    if (lit := litgpt_state(raw)) is not None:
        state, recorded = read_litgpt_adapter(lit, str(path))
        return AdapterSource(path, state, recorded, True, {})
    if (original := original_state(raw, str(path))) is not None:
        return AdapterSource(path, original, {}, True, {}, original=True)
    recorded = {}
    if isinstance(raw, dict) and isinstance(raw.get("config"), dict):  # a training checkpoint
        recorded = {k: raw["config"][k] for k in ("gate_activation",) if k in raw["config"]}
        if isinstance(raw.get("adapter"), dict) and "scale_tuning" in raw["adapter"]:
            recorded["scale_tuning"] = raw["adapter"]["scale_tuning"]
    return AdapterSource(path, _unwrap_pt(raw, path), recorded, False, _checkpoint_metadata(raw))


def _checkpoint_metadata(raw: Any) -> dict[str, str]:
    recorded = raw.get("metadata") if isinstance(raw, dict) else None
    if isinstance(recorded, dict):
        return {str(k): str(v) for k, v in recorded.items()}
    # A checkpoint written before checkpoints recorded metadata: its configuration's template.
    template = raw.get("config", {}).get("template") if isinstance(raw, dict) and "trainable" in raw else None
    return {"template": template} if isinstance(template, str) else {}


def read_adapter_file(path: str | os.PathLike | AdapterSource,
                      model_config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors of any adapter source (see `read_adapter`; or one it has read); given
    the model's `model_config`, a source whose settings would compute another model is a
    ValueError (see `check_recorded_settings`)."""
    source = path if isinstance(path, AdapterSource) else read_adapter(path)
    if model_config is not None:
        check_recorded_settings(source, model_config)
    return source.state


# What an adapter records of its training beside its settings, and a conversion carries.
RECORDED_FIELDS = ("base", "template", "tokenizer_sha256")


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """What training recorded with an adapter (the base, the step, the prompt template, the
    tokenizer's SHA-256): a .safetensors file's metadata, or a training checkpoint's record;
    {} for files that record none (PEFT, litgpt, the original releases)."""
    return read_adapter(path).metadata


_ADAPTER_FIELD_CHECKS = {
    "adapter_len": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
    "adapter_layers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
    "gate_activation": (lambda v: v in GATE_ACTIVATIONS, f"one of {GATE_ACTIVATIONS}"),
    "scalar_gate": (lambda v: isinstance(v, bool), "true or false"),
    "bias_tuning": (lambda v: isinstance(v, list) and set(v) <= set(TUNABLE_LINEARS),
                    f"a list of layer names from {TUNABLE_LINEARS}"),
    "scale_tuning": (lambda v: v in SCALE_PLACEMENTS, f"one of {SCALE_PLACEMENTS}"),
    "norm_tuning": (lambda v: isinstance(v, bool), "true or false"),
    "prefix_projection": (lambda v: v in PREFIX_PROJECTIONS, f"one of {PREFIX_PROJECTIONS}"),
}


def _recorded_config(meta: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The adapter_config metadata of a .safetensors adapter, checked key by key."""
    if "adapter_config" not in meta:
        return {}
    try:
        config = json.loads(meta["adapter_config"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its adapter_config metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its adapter_config metadata must be a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - set(ADAPTER_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} in its adapter_config metadata (known: {ADAPTER_FIELDS})")
    for key, value in config.items():
        valid, expected = _ADAPTER_FIELD_CHECKS[key]
        if not valid(value):
            raise ValueError(f"{path}: adapter_config {key} must be {expected}, got {value!r}")
    return config


def _config_from_shapes(shapes: Mapping[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    prompts = {k: s for k, s in shapes.items() if k.endswith(".adapter_prompt")}
    gates = [s for k, s in shapes.items() if k.endswith(".gate")]
    if not prompts:
        raise ValueError(f"{path}: no adapter_prompt tensors found")
    lengths = {s[0] if len(s) == 2 else None for s in prompts.values()}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(f"{path}: the adapter prompts must all have the shape (adapter_len, dim), got "
                         f"{sorted(set(prompts.values()))}")
    config = {"adapter_len": lengths.pop(), "adapter_layers": len(prompts),
              "scalar_gate": bool(gates) and all(len(s) == 0 for s in gates)}
    return {**config, **_tuning_from_shapes(shapes)}


def _tuning_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """V2's tuning as far as the tensors tell it: which linear layers have a tuned bias,
    whether any has a scale, and whether the norms are there. The scale's placement shows
    only where a scale's size differs from its bias's (in_features against out_features);
    otherwise the file's metadata says it."""
    tuned = {k.rsplit(".", 2)[-2] for k in shapes if k.endswith(".tuned_bias")}
    norms = any(k.endswith("norm.weight") for k in shapes)
    if not tuned and not norms:
        return {}  # a V1 adapter
    config: dict[str, Any] = {"bias_tuning": [n for n in TUNABLE_LINEARS if n in tuned], "norm_tuning": norms}
    scales = {k.removesuffix(".tuned_scale"): s for k, s in shapes.items() if k.endswith(".tuned_scale")}
    if tuned and not scales:
        config["scale_tuning"] = "none"
    elif any(s != shapes.get(f"{k}.tuned_bias") for k, s in scales.items()):
        config["scale_tuning"] = "input"
    return config


def read_adapter_config(path: str | os.PathLike, **given: Any) -> dict[str, Any]:
    """The adapter fields (adapter_len, adapter_layers, gate_activation, scalar_gate, V2's
    tuning, the prefix projection) of an adapter source: see `adapter_config`."""
    return adapter_config(read_adapter(path), **given)


def adapter_config(source: AdapterSource, **given: Any) -> dict[str, Any]:
    """The adapter fields of `source`, so that a model can be built to match it, checked
    against its tensors' shapes before the model is allocated. `given` (the same fields;
    None means not given) supplies what an original LLaMA-Adapter file does not record,
    and must agree with what a source does record."""
    path = source.path
    given = {k: v for k, v in given.items() if v is not None}
    if "bias_tuning" in given:  # as the file records it: a list in TUNABLE_LINEARS' order
        given["bias_tuning"] = [n for n in TUNABLE_LINEARS if n in given["bias_tuning"]]
    unknown = sorted(set(given) - set(ADAPTER_FIELDS))
    if unknown:
        raise TypeError(f"read_adapter_config got unknown fields {unknown} (known: {ADAPTER_FIELDS})")
    recorded = original_config(source.state, str(path), given) if source.original else source.recorded
    shapes = {k: tuple(v.shape) for k, v in source.state.items()}
    config = {} if source.complete else _config_from_shapes(shapes, path)
    for key, value in recorded.items():
        if key in config and config[key] != value:
            raise ValueError(f"{path}: its adapter_config metadata says {key} {value!r}, its tensors say "
                             f"{config[key]!r}")
    config.update(recorded)
    for key, value in given.items():
        if key in config and config[key] != value:
            raise ValueError(f"--{key.replace('_', '-')} {value} disagrees with {path}, which holds {key} "
                             f"{config[key]!r}")
        config[key] = value
    return config


# Settings that change what an adapter computes without changing its tensors' shapes, with
# the value a file that does not record one means.
_SHAPELESS_SETTINGS = {"gate_activation": None, "prefix_projection": "own", "scale_tuning": None}


def check_recorded_settings(source: AdapterSource, model_config: Mapping[str, Any]) -> None:
    """A ValueError naming the setting where the adapter `source` records a gate activation,
    prefix projection or scale placement other than the model's (`model_config`, as
    `ModelArgs.adapter_config` gives it): its tensors would load, and compute another model.
    Shapes (length, layers, gates, V2's tensors) are checked when the tensors are copied.
    An original release's file records no gate activation (its scripts applied tanh, V1's
    first one the gate as it is), so there the model's stands."""
    path, original = source.path, source.original
    # An original file's length and layers are the model's where its gates do not tell them.
    shape = {k: model_config[k] for k in ("adapter_len", "adapter_layers")} if original else {}
    recorded = adapter_config(source, **shape)
    if original:
        recorded.pop("gate_activation", None)
    for name, unrecorded in _SHAPELESS_SETTINGS.items():
        # adapter_config leaves out what a file leaves out, so both default alike.
        theirs, ours = recorded.get(name, unrecorded), model_config.get(name, unrecorded)
        if theirs is not None and ours is not None and theirs != ours:
            raise ValueError(f"load_adapter: {path} records {name} {theirs!r}, the model has {ours!r}: it "
                             f"would compute another model; build the model with the adapter's settings "
                             f"(read_adapter_config({str(path)!r}))")


def copy_adapter_state(own: Mapping[str, torch.Tensor], state: Mapping[str, Any], source: str, described: str,
                       strict: bool = True) -> None:
    """Copy `state` into a model's adapter parameters `own` after checking every name, shape
    and value (nothing is copied when anything is wrong); `described` is the model's adapter
    settings, for the error message."""
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unexpected or (strict and missing):
        raise ValueError(f"{source}: adapter weights do not match this model ({described}): missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{source}: {name} must be a tensor, got {type(value).__name__}")
        if value.shape != own[name].shape:
            raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, this model expects "
                             f"{tuple(own[name].shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{source}: {name} holds non-finite values (a corrupt or diverged adapter?)")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)
