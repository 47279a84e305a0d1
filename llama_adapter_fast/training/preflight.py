"""The finetune preflight: everything a run decides before the base loads, decided once.

`plan_finetune` turns the command's settings into a `FinetunePlan`:

- what the run starts from: nothing, a training checkpoint to continue (read here, once, and
  handed to the trainer), or an adapter file a new run starts from (this package's, an
  original, PEFT or litgpt one), with the settings it records;
- on resume, the settings: every option the command did not give is the checkpoint's (a
  resumed run continues as it was set up), the given ones that differ are reported, and
  those a resumed run must keep are refused before anything loads;
- the settings validated once, for the world size; the base's format; the tokenizer and the
  prompt template it resolves to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llama_adapter_fast.models.formats.litgpt import litgpt_state
from llama_adapter_fast.models.formats.native import AdapterSource, adapter_config, loaded_adapter, read_adapter
from llama_adapter_fast.models.formats.original import original_state
from llama_adapter_fast.models.formats.peft import is_peft_folder
from llama_adapter_fast.models.multimodal import read_image_adapter_record
from llama_adapter_fast.models.quantized import check_quantization
from llama_adapter_fast.training.bases import base_format, load_tokenizer
from llama_adapter_fast.training.config import (
    DTYPES,
    RESUME_FIXED,
    RESUME_UNREPORTED,
    TrainConfig,
    check_attention_backend,
    option_name,
)
from llama_adapter_fast.training.distributed import Dist
from llama_adapter_fast.training.run_folder import check_fresh_out, checkpoint_state, resolve_resume
from llama_adapter_fast.training.templates import resolve_template
from llama_adapter_fast.training.tokenizer import HFTokenizer, Tokenizer
from llama_adapter_fast.training.trainer import amp_dtype_for

# Settings of this invocation rather than of the run: never taken from a checkpoint.
INVOCATION = (*RESUME_UNREPORTED, "out_dir", "device", "attention_backend", "strategy")


@dataclass(frozen=True)
class FinetunePlan:
    """What `finetune` runs: the settings (validated; on resume, completed from the
    checkpoint), the tokenizer, the base's format, and what the run starts from."""

    cfg: TrainConfig
    tokenizer: Tokenizer | HFTokenizer
    base_format: str | None = None
    checkpoint: Path | None = None  # a training checkpoint this run continues
    checkpoint_state: dict[str, Any] | None = None  # its contents, read once
    start_from: AdapterSource | None = None  # an adapter a new run starts from, read


def plan_finetune(cfg: TrainConfig, info: Dist, device: torch.device, *, given: Collection[str] | None = None,
                  tokenizer: Tokenizer | HFTokenizer | None = None, has_model: bool = False) -> FinetunePlan:
    """Decide everything `finetune` needs before loading the base. `given`: the settings
    the caller chose (the command line's options), None for all of cfg; on resume the
    others are the checkpoint's. `has_model`: the caller brings the model (no base loads)."""
    source = resolve_resume(cfg)
    state = start_from = None
    if source is not None:
        kind, read = read_resume_source(source, adapters=not has_model)
        if kind == "adapter":
            start_from, source = read, None
            cfg = _with_adapter_settings(cfg, start_from, info.main)
        else:
            state = read
            cfg = _inherited_settings(cfg, state, given)
    cfg.validate(info.world_size)
    check_attention_backend(cfg.attention_backend, device, amp_dtype_for(cfg.precision, device),
                            f"--precision {cfg.precision}")
    if cfg.dtype is not None:
        check_attention_backend(cfg.attention_backend, device, DTYPES[cfg.dtype], f"--dtype {cfg.dtype}")
    check_quantization(cfg.quantize, device)  # before anything is written
    if cfg.base is not None and Path(cfg.out_dir).resolve() == Path(cfg.base).resolve():
        raise ValueError(f"--out {cfg.out_dir} is the base folder: the run's files would mix with the base "
                         f"model's; choose another --out")
    if source is None and info.main:
        check_fresh_out(cfg)
    if cfg.data is None:
        raise ValueError("data: an instruction file is required")
    fmt = None
    if not has_model:
        if cfg.base is None:
            raise ValueError("base: a base model folder is required (Hugging Face or Meta format)")
        fmt = base_format(cfg.base)  # a wrong folder fails before anything loads
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer, cfg.base)
    cfg = dataclasses.replace(cfg, template=resolve_template(cfg.template, tokenizer))
    if state is not None:
        _check_resumed_settings(cfg, state, source, given, info.main)
    return FinetunePlan(cfg, tokenizer, fmt, source, state, start_from)


def read_resume_source(path: Path, adapters: bool = True) -> tuple[str, Any]:
    """("checkpoint", its state) for a training checkpoint, or (with `adapters`) ("adapter",
    its AdapterSource) for an adapter a new run starts from; a ValueError naming the file
    otherwise. The file is read once, to be told apart and to be used."""
    if adapters and (is_peft_folder(path) or path.suffix == ".safetensors"):
        return "adapter", read_adapter(path)
    if not path.is_file():
        return "checkpoint", checkpoint_state(path, None)  # its error: missing, a folder
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        return "checkpoint", checkpoint_state(path, exc)
    if adapters and isinstance(raw, dict) and (original_state(raw, str(path)) is not None
                                               or litgpt_state(raw) is not None):
        return "adapter", loaded_adapter(path, raw)
    return "checkpoint", checkpoint_state(path, raw)


def _with_adapter_settings(cfg: TrainConfig, adapter: AdapterSource, main: bool) -> TrainConfig:
    """cfg with the adapter settings of the file or folder a new run starts from."""
    if read_image_adapter_record(adapter.path) is not None:
        raise ValueError(f"resume: {adapter.path} is a multi-modal adapter: resume its run from its checkpoint.pt")
    given = {"adapter_len": None, "adapter_layers": cfg.adapter_layers, "gate_activation": None}
    settings = adapter_config(adapter, **given)
    changes = {k: v for k, v in settings.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    if main:
        shown = ", ".join(f"{k} {v}" for k, v in changes.items())
        print(f"resume: a new run from the adapter {adapter.path} ({shown}), at step 0 with a fresh optimizer")
    return dataclasses.replace(cfg, **changes, resume=False)


def _inherited_settings(cfg: TrainConfig, state: dict[str, Any], given: Collection[str] | None) -> TrainConfig:
    """cfg with every setting the caller did not give taken from the checkpoint `state` (a
    resumed run continues as it was set up), except this invocation's own (INVOCATION)."""
    if given is None:
        return cfg
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return dataclasses.replace(cfg, **{name: value for name, value in state["config"].items()
                                       if name in fields and name not in given and name not in INVOCATION})


def _check_resumed_settings(cfg: TrainConfig, state: dict[str, Any], path: Path, given: Collection[str] | None,
                            main: bool) -> None:
    """Refuse a given setting that a resumed run must keep; report the others that changed."""
    saved = state["config"]
    for name, why in RESUME_FIXED.items():
        if name in saved and saved[name] != getattr(cfg, name):
            raise ValueError(f"resume: {option_name(name)} was {saved[name]!r} for {path}, this run has "
                             f"{getattr(cfg, name)!r}: {why}; keep it, or start a new run (another --out, or "
                             f"--overwrite)")
    chosen = set(saved) if given is None else set(given) & set(saved)
    changed = [f"{option_name(name)} {_shown(saved[name])} -> {_shown(getattr(cfg, name))}"
               for name in sorted(chosen) if name not in RESUME_UNREPORTED and saved[name] != getattr(cfg, name)]
    if changed and main:
        print(f"resume: changed settings, honoured from step {state['step']} on: {', '.join(changed)}")


def _shown(value: Any) -> str:
    return "default" if value is None else str(value)


__all__ = ["FinetunePlan", "plan_finetune", "read_resume_source", "INVOCATION"]
