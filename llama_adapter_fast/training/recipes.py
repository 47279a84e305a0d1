"""`finetune` (the adapter of a base model on instruction data) and `pretrain` (a small base
from scratch, for the demo), with the base and tokenizer they load."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llama_adapter_fast.models import LLaMAAdapter, ModelArgs
from llama_adapter_fast.models.formats.gguf import check_gguf, gguf_base_folder, is_gguf
from llama_adapter_fast.models.formats.native import read_adapter_config
from llama_adapter_fast.training.config import DTYPES, TrainConfig
from llama_adapter_fast.training.data import InstructionDataset, TextDataset
from llama_adapter_fast.training.distributed import Dist, init_distributed
from llama_adapter_fast.training.run_folder import (
    ADAPTER,
    METRICS,
    PLOT,
    check_fresh_out,
    out_folder_lock,
    read_checkpoint,
    resolve_resume,
    write_loss_plot,
)
from llama_adapter_fast.training.templates import resolve_template, tokenizer_fingerprint
from llama_adapter_fast.training.tokenizer import HFTokenizer, Tokenizer, open_tokenizer
from llama_adapter_fast.training.trainer import Trainer, TrainResult, amp_dtype_for, check_attention_dtype


def base_format(path: str | os.PathLike) -> str:
    """"hf" for a Hugging Face folder (config.json), "meta" for Meta's (params.json), "gguf"
    for a GGUF file."""
    folder = Path(path)
    if folder.is_file():
        if not is_gguf(folder):
            check_gguf(folder)  # its error, naming the file
        return "gguf"  # the whole check comes before a conversion (gguf_base_folder)
    if (folder / "config.json").is_file():
        return "hf"
    if (folder / "params.json").is_file():
        return "meta"
    raise ValueError(f"base: {folder} is neither a GGUF file nor a folder with config.json (Hugging Face) or "
                     f"params.json (Meta)")


def base_folder(path: str | os.PathLike) -> Path:
    """The folder to load a base from: the path itself, or for a GGUF file the Hugging Face
    folder it is converted into once (see models.gguf)."""
    return gguf_base_folder(path) if base_format(path) == "gguf" else Path(path)


def load_base(path: str | os.PathLike, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, **adapter: Any) -> LLaMAAdapter:
    """A Hugging Face folder (config.json), a Meta folder (params.json) or a GGUF file
    (dequantized, then cast to `dtype` if given)."""
    folder = base_folder(path)
    loader = LLaMAAdapter.from_hf if base_format(folder) == "hf" else LLaMAAdapter.from_meta
    return loader(folder, device=device, dtype=dtype, **adapter)


def load_tokenizer(path: str | None, base: str | None) -> Tokenizer | HFTokenizer:
    """`path` if given, else the base folder's tokenizer (tokenizer.model or tokenizer.json),
    else (no base) the bundled one."""
    if path is not None:
        return open_tokenizer(path)
    if base is None:
        return open_tokenizer(None)
    folder = gguf_base_folder(base) if Path(base).is_file() else Path(base)
    if not ((folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()):
        raise ValueError(f"base: {base} has no tokenizer.model or tokenizer.json: pass the base model's tokenizer "
                         f"with --tokenizer")
    return open_tokenizer(folder)


def check_vocabulary(tokenizer: Tokenizer | HFTokenizer, vocab_size: int) -> None:
    """A tokenizer whose ids the model's embedding cannot hold is the wrong one for the base."""
    if tokenizer.n_words > vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.n_words} tokens, more than the model's "
                         f"vocab_size {vocab_size}: wrong tokenizer for this base?")


def finetune(cfg: TrainConfig, *, model: LLaMAAdapter | None = None, tokenizer: Tokenizer | None = None,
             callback: Callable[[str, int], None] | None = None) -> TrainResult:
    """Fine-tune the adapter of `model` (or of the base at cfg.base) on cfg.data.

    Writes into cfg.out_dir: adapter.safetensors (the result), checkpoint.pt (training state
    for --resume), metrics.jsonl, loss.png and train_config.json, holding the folder's lock
    (out_folder_lock) meanwhile. `callback(event, n)` is called at each micro-step
    ("micro_step"), right after each optimizer update ("optimizer_step") and after each step
    ("step"); tests use it to interrupt a run.
    With cfg.image_encoder (or a MultiModalLLaMAAdapter as `model`) the multi-modal adapter
    trains: records may carry an "image", and the projection trains with prompts and gates.
    """
    cfg.validate()
    info, device = init_distributed(cfg.device)
    cfg.validate(info.world_size)
    check_attention_dtype(cfg.attention_backend, device, amp_dtype_for(cfg.precision, device),
                          f"--precision {cfg.precision}")
    if cfg.dtype is not None:
        check_attention_dtype(cfg.attention_backend, device, DTYPES[cfg.dtype], f"--dtype {cfg.dtype}")
    if cfg.base is not None and Path(cfg.out_dir).resolve() == Path(cfg.base).resolve():
        raise ValueError(f"--out {cfg.out_dir} is the base folder: the run's files would mix with the base "
                         f"model's; choose another --out")
    # The out folder is checked (and taken) before minutes go into loading the base.
    with out_folder_lock(cfg.out_dir) if info.main else contextlib.nullcontext():
        return _finetune(cfg, info, device, model, tokenizer, callback)


def is_adapter_source(path: Path) -> bool:
    """An adapter in a format `load_adapter` reads (this package's .safetensors, an original
    V1 or V2 .pth, a PEFT folder, a litgpt checkpoint) rather than a training checkpoint."""
    from llama_adapter_fast.models.formats.litgpt import litgpt_state
    from llama_adapter_fast.models.formats.original import original_state
    from llama_adapter_fast.models.formats.peft import is_peft_folder

    if is_peft_folder(path) or path.suffix == ".safetensors":
        return True
    if not path.is_file():
        return False
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False  # read_checkpoint names the problem
    return original_state(raw, str(path)) is not None or litgpt_state(raw) is not None


def _with_adapter_settings(cfg: TrainConfig, adapter: Path, main: bool) -> TrainConfig:
    """cfg with the adapter settings of the file or folder a new run starts from."""
    from llama_adapter_fast.models.multimodal import read_image_adapter_record

    if read_image_adapter_record(adapter) is not None:
        raise ValueError(f"resume: {adapter} is a multi-modal adapter: resume its run from its checkpoint.pt")
    given = {"adapter_len": None, "adapter_layers": cfg.adapter_layers, "gate_activation": None}
    settings = read_adapter_config(adapter, **given)
    changes = {k: v for k, v in settings.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    if main:
        shown = ", ".join(f"{k} {v}" for k, v in changes.items())
        print(f"resume: a new run from the adapter {adapter} ({shown}), at step 0 with a fresh optimizer")
    return dataclasses.replace(cfg, **changes, resume=False)


def _finetune(cfg: TrainConfig, info: Dist, device: torch.device, model: LLaMAAdapter | None,
              tokenizer: Tokenizer | None, callback: Callable[[str, int], None] | None) -> TrainResult:
    resume = resolve_resume(cfg)
    start_from = None
    if resume is not None and model is None and is_adapter_source(resume):
        # An adapter, not a training checkpoint: a new run from its weights and settings.
        start_from, resume = resume, None
        cfg = _with_adapter_settings(cfg, start_from, info.main)
    if resume is None and info.main:
        check_fresh_out(cfg)
    elif resume is not None and not resume.is_file():
        read_checkpoint(resume)  # its error (missing, a folder) before minutes of loading
    # The same seed on every process: FSDP does not broadcast the initial prompts.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if model is None and cfg.base is not None:
        base_format(cfg.base)  # a wrong folder fails before anything loads
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer, cfg.base)
    cfg = dataclasses.replace(cfg, template=resolve_template(cfg.template, tokenizer))
    if model is None:
        if cfg.base is None:
            raise ValueError("base: a base model folder is required (Hugging Face or Meta format)")
        adapter = {"adapter_len": cfg.adapter_len, "gate_activation": cfg.gate_activation,
                   "scalar_gate": cfg.scalar_gate, "attention_backend": cfg.attention_backend,
                   "bias_tuning": tuple(cfg.bias_tuning or ()), "scale_tuning": cfg.scale_tuning,
                   "norm_tuning": cfg.norm_tuning, "prefix_projection": cfg.prefix_projection}
        if cfg.adapter_layers is not None:
            adapter["adapter_layers"] = cfg.adapter_layers
        model = load_base(cfg.base, dtype=DTYPES[cfg.dtype] if cfg.dtype else None, **adapter)
        if start_from is not None:
            model.load_adapter(start_from)
    check_vocabulary(tokenizer, model.args.vocab_size)
    if cfg.data is None:
        raise ValueError("data: an instruction file is required")
    if cfg.max_seq_len > model.args.max_seq_len and info.main:
        print(f"warning: max_seq_len {cfg.max_seq_len} exceeds the base model's context of {model.args.max_seq_len}")
    if cfg.image_encoder is not None or hasattr(model, "image_encoder"):  # the multi-modal adapter
        from llama_adapter_fast.training.multimodal import prepare_finetune

        model, dataset = prepare_finetune(cfg, model, tokenizer, progress=cfg.progress and info.main)
    else:
        dataset = InstructionDataset(cfg.data, tokenizer, max_seq_len=cfg.max_seq_len, template=cfg.template)
        first = next((i for i, r in enumerate(dataset.records) if "image" in r), None)
        if first is not None:
            raise ValueError(f"{cfg.data}: record {first} has an image: pass image_encoder (--image-encoder) to "
                             f"train the multi-modal adapter")
    if dataset.num_without_response == len(dataset):
        raise ValueError(f"no record keeps a response token within --max-seq-len {cfg.max_seq_len}: the prompts "
                         f"fill it, so training would learn nothing (raise --max-seq-len)")
    if dataset.num_without_response and info.main:
        print(f"warning: {dataset.num_without_response} of {len(dataset)} records have no response token "
              f"within max_seq_len={cfg.max_seq_len}")
    # The prompt format and the tokenizer, which generation must use as training did.
    metadata = {"base": str(cfg.base), "template": cfg.template}
    if getattr(tokenizer, "path", None):
        metadata["tokenizer_sha256"] = tokenizer_fingerprint(tokenizer)
    trainer = Trainer(cfg, model, dataset, tokenizer, info, device, trainable="adapter", data_file=cfg.data,
                      metadata=metadata)
    out = Path(cfg.out_dir)

    def save_adapter() -> Path | None:
        # Every process takes part in gathering a sharded adapter; the first one writes.
        state = trainer.trainable_state() if cfg.strategy == "fsdp" and info.enabled else None
        path = out / ADAPTER
        if info.main:
            trainer.module.save_adapter(path, metadata={**metadata, "step": str(trainer.step)}, tensors=state)
            return path
        return None

    result = trainer.run(resume=resume, save_final=save_adapter, callback=callback)
    return _with_loss_plot(result, cfg, info, "LLaMA-Adapter fine-tuning", "cross-entropy on response tokens")


def pretrain(cfg: TrainConfig, args: ModelArgs, text_path: str | os.PathLike, *,
             tokenizer: Tokenizer | None = None) -> tuple[LLaMAAdapter, TrainResult]:
    """Train a small LLaMA from scratch (all weights) on a text file and save it as a
    Hugging Face folder in cfg.out_dir (with the tokenizer). For the demo: the bundled data
    have no pretrained base, so the demo makes one in a minute."""
    cfg.validate()
    info, device = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer, None)
    model = LLaMAAdapter(dataclasses.replace(args, adapter_layers=0))
    dataset = TextDataset(text_path, tokenizer, max_seq_len=cfg.max_seq_len)
    # Pretraining blocks are already full (documents are joined into one stream): no packing.
    trainer = Trainer(cfg, model, dataset, tokenizer, info, device, trainable="all", bar_label="base",
                      data_file=text_path, pack=False)
    out = Path(cfg.out_dir)

    def save_base() -> Path | None:
        if not info.main:
            return None
        model.save_hf(out)
        (out / "tokenizer.model").write_bytes(Path(tokenizer.path).read_bytes())
        return out

    with out_folder_lock(cfg.out_dir) if info.main else contextlib.nullcontext():
        result = trainer.run(resume=resolve_resume(cfg), save_final=save_base)
    model.freeze_base()
    return model, _with_loss_plot(result, cfg, info, "base model pretraining", "cross-entropy")


def _with_loss_plot(result: TrainResult, cfg: TrainConfig, info: Dist, title: str, ylabel: str) -> TrainResult:
    """The run's result, with the loss plot of its metrics written beside them (cfg.plot)."""
    metrics = result.out_dir / METRICS
    if not (cfg.plot and info.main and metrics.exists()):
        return result
    return dataclasses.replace(result, plot_path=write_loss_plot(metrics, result.out_dir / PLOT, title=title,
                                                                 ylabel=ylabel))
