"""`finetune` (the adapter of a base model on instruction data) and `pretrain` (a small base
from scratch, for the demo)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Callable, Collection
from pathlib import Path

import torch

from llama_adapter_fast.models import LLaMAAdapter, ModelArgs
from llama_adapter_fast.training.bases import check_vocabulary, load_base, load_tokenizer
from llama_adapter_fast.training.config import DTYPES, TrainConfig
from llama_adapter_fast.training.data import InstructionDataset, TextDataset
from llama_adapter_fast.training.distributed import Dist, init_distributed
from llama_adapter_fast.training.preflight import FinetunePlan, plan_finetune
from llama_adapter_fast.training.run_folder import (
    ADAPTER,
    METRICS,
    PLOT,
    out_folder_lock,
    resolve_resume,
    write_loss_plot,
)
from llama_adapter_fast.training.templates import tokenizer_fingerprint
from llama_adapter_fast.training.tokenizer import Tokenizer
from llama_adapter_fast.training.trainer import Trainer, TrainResult


def finetune(cfg: TrainConfig, *, model: LLaMAAdapter | None = None, tokenizer: Tokenizer | None = None,
             callback: Callable[[str, int], None] | None = None, given: Collection[str] | None = None
             ) -> TrainResult:
    """Fine-tune the adapter of `model` (or of the base at cfg.base) on cfg.data.

    Writes into cfg.out_dir: adapter.safetensors (the result), checkpoint.pt (training state
    for --resume), metrics.jsonl, loss.png and train_config.json, holding the folder's lock
    (out_folder_lock) meanwhile. `callback(event, n)` is called at each micro-step
    ("micro_step"), right after each optimizer update ("optimizer_step") and after each step
    ("step"); tests use it to interrupt a run.
    With cfg.image_encoder (or a MultiModalLLaMAAdapter as `model`) the multi-modal adapter
    trains: records may carry an "image", and the projection trains with prompts and gates.
    `given`: the settings the caller chose (the command line passes the options it was
    given; None: all of cfg). A resumed run takes the others from its checkpoint.
    """
    info, device = init_distributed(cfg.device)
    plan = plan_finetune(cfg, info, device, given=given, tokenizer=tokenizer, has_model=model is not None)
    # The out folder is checked (and taken) before minutes go into loading the base.
    with out_folder_lock(plan.cfg.out_dir) if info.main else contextlib.nullcontext():
        return _finetune(plan, info, device, model, callback)


def _finetune(plan: FinetunePlan, info: Dist, device: torch.device, model: LLaMAAdapter | None,
              callback: Callable[[str, int], None] | None) -> TrainResult:
    cfg, tokenizer = plan.cfg, plan.tokenizer
    # The same seed on every process: FSDP does not broadcast the initial prompts.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if model is None:
        adapter = {"adapter_len": cfg.adapter_len, "gate_activation": cfg.gate_activation,
                   "scalar_gate": cfg.scalar_gate, "attention_backend": cfg.attention_backend,
                   "bias_tuning": tuple(cfg.bias_tuning or ()), "scale_tuning": cfg.scale_tuning,
                   "norm_tuning": cfg.norm_tuning, "prefix_projection": cfg.prefix_projection}
        if cfg.adapter_layers is not None:
            adapter["adapter_layers"] = cfg.adapter_layers
        # A quantized base quantizes on its way to the device: its float weights never go there.
        model = load_base(cfg.base, dtype=DTYPES[cfg.dtype] if cfg.dtype else None, known_format=plan.base_format,
                          quantize=cfg.quantize, device=device if cfg.quantize else None, **adapter)
        if plan.start_from is not None:
            model.load_adapter(plan.start_from)
    check_vocabulary(tokenizer, model.args.vocab_size)
    getattr(model, "llama", model).activation_checkpointing = cfg.activation_checkpointing  # a multi-modal one's LLaMA
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
    empty = getattr(dataset, "empty_answers", [])
    if empty and info.main:
        print(f"warning: {len(empty)} of {len(dataset)} records of {cfg.data} have an empty answer (record "
              f"{empty[0]} first): they teach the model to end its turn at once")
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

    result = trainer.run(resume=plan.checkpoint, checkpoint=plan.checkpoint_state, save_final=save_adapter,
                         callback=callback)
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
