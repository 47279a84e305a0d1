"""The training loop shared by adapter fine-tuning and the demo's pretraining.

AdamW with betas (0.9, 0.95) and weight decay on matrices only (the original's timm rule:
none on gates and other 1-d tensors), linear warmup then a half-cosine decay (the
original's schedule), gradient accumulation, gradient clipping, bf16/fp16 autocast on a
GPU, a tqdm progress bar with loss and tokens/s, metrics as JSON Lines, checkpoints written
atomically, exact resume, and a loss plot at the end.

Data-parallel on several GPUs or machines: launch with torchrun. Each optimizer step takes
one global batch of batch_size * grad_accum * world_size records; each process takes its
slice. The loss is the mean over the response tokens of the whole global batch (the token
count is summed over processes before the backward pass), so the update is the same as one
process with the whole batch would make. `strategy="ddp"` replicates the model;
`strategy="fsdp"` shards it (FSDP2's fully_shard on every block) for bases that do not fit
one GPU. Without a GPU the gloo backend runs the same code on CPU processes.

The data order is a function of the seed and the step (one permutation per epoch), so a
resumed run sees exactly the records the uninterrupted run would have seen.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_adapter_fast.files import atomic_write, file_sha256
from llama_adapter_fast.models import LLaMAAdapter, ModelArgs
from llama_adapter_fast.models.config import ADAPTER_FIELDS
from llama_adapter_fast.models.quantized import num_parameters
from llama_adapter_fast.training.config import TrainConfig, check_attention_backend
from llama_adapter_fast.training.data import IGNORE_INDEX, collate, collate_packed, pack_records
from llama_adapter_fast.training.distributed import Dist, all_reduce_max, all_reduce_sum
from llama_adapter_fast.training.run_folder import (
    ADAPTER,
    CHECKPOINT,
    METRICS,
    PLOT,
    check_fresh_out,
    check_resume_settings,
    read_checkpoint,
    read_metrics,
    rng_state,
    set_rng_state,
    sigint_deferred,
)
from llama_adapter_fast.training.schedule import Schedule, param_groups, step_indices
from llama_adapter_fast.training.tokenizer import Tokenizer


def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a --precision on a device (None: no autocast)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _real_tokens(items: list[dict[str, torch.Tensor]]) -> int:
    return sum(item["tokens"].numel() for item in items)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _examples_sha256(dataset) -> str:
    """The tokenized records (inputs and labels), as the model sees them."""
    digest = hashlib.sha256()
    for tokens, labels in getattr(dataset, "examples", []):
        digest.update(array.array("q", tokens).tobytes() + b"|" + array.array("q", labels).tobytes() + b";")
    return digest.hexdigest()


def _base_args(args: ModelArgs) -> dict[str, Any]:
    """The base model's architecture (ModelArgs without the adapter and the backend)."""
    skip = set(ADAPTER_FIELDS) | {"attention_backend"}
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in skip}


_PARAMETER_KINDS = (("prompts and gates", (".adapter_prompt", ".gate")),
                    ("V2 biases and scales", (".tuned_bias", ".tuned_scale")), ("norms", ("norm.weight",)))


def describe_trainable(named: list[tuple[str, torch.nn.Parameter]], total: int) -> str:
    """'trainable parameters: N of M (prompts and gates a, V2 biases and scales b, ...)'."""
    counts: dict[str, int] = {}
    for name, p in named:
        kind = next((k for k, suffixes in _PARAMETER_KINDS if name.endswith(suffixes)), "other")
        counts[kind] = counts.get(kind, 0) + p.numel()
    n = sum(counts.values())
    order = [k for k, _ in _PARAMETER_KINDS] + ["other"]
    parts = ", ".join(f"{kind} {counts[kind]:,}" for kind in order if kind in counts)
    return f"trainable parameters: {n:,} of {total:,} ({100 * n / max(total, 1):.3f}%: {parts})"


@dataclass
class TrainResult:
    """A run's outcome: `steps` is the last step, `resumed_at` the step this process started
    from (0 for a new run), `history` the metrics rows of the steps this process ran."""

    steps: int
    final_loss: float
    first_loss: float
    out_dir: Path
    adapter_path: Path | None
    plot_path: Path | None
    seconds: float
    tokens_per_s: float
    history: list[dict] = dataclasses.field(default_factory=list)
    resumed_at: int = 0


class Trainer:
    """The shared loop. `trainable` selects the parameters that learn ("adapter" or "all");
    `save_final` writes the result (the adapter file, or the base model folder). `data_file`
    is the file the dataset was read from: a resumed run must read the same bytes. `metadata`
    is what the run's adapter records (its template and tokenizer), which every checkpoint
    records too, so that generation from a checkpoint follows it as it follows the adapter."""

    def __init__(self, cfg: TrainConfig, model: LLaMAAdapter, dataset, tokenizer: Tokenizer, info: Dist,
                 device: torch.device, trainable: str = "adapter", bar_label: str = "adapter",
                 data_file: str | os.PathLike | None = None, pack: bool | None = None,
                 metadata: dict[str, str] | None = None):
        # Packed micro-batches hold the same records as padded ones, without the padding.
        self.pack = cfg.pack if pack is None else pack
        self.pack_tokens = cfg.pack_tokens or cfg.batch_size * cfg.max_seq_len
        self.cfg, self.dataset, self.tokenizer, self.info, self.device = cfg, dataset, tokenizer, info, device
        self.bar_label = bar_label
        self.metadata = dict(metadata or {})
        self.out = Path(cfg.out_dir)
        self.module = model  # the unwrapped model
        if trainable == "all":
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            model.freeze_base()
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_trainable:
            raise ValueError("the model has no trainable parameters (adapter_layers = 0?)")
        if len(dataset) == 0:
            raise ValueError("the training data set is empty")
        if info.main:
            print(describe_trainable(self.named_trainable, num_parameters(model)))

        self.global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
        steps_per_epoch = math.ceil(len(dataset) / self.global_batch)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, self.total_steps // 10)
        self.peak_lr = cfg.peak_lr(info.world_size)

        self.amp_dtype = self._amp_dtype()
        if model.args.adapter_layers > 0:
            weights = model.tok_embeddings.weight.dtype
            name = str(weights).removeprefix("torch.")
            option = f"--precision {cfg.precision}" if self.amp_dtype else f"a {name} base (--dtype)"
            check_attention_backend(model.args.attention_backend, device, self.amp_dtype or weights, option)
        self.model = self._wrap(model)
        trainable_now = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(param_groups(trainable_now, cfg.weight_decay), lr=self.peak_lr,
                                           betas=(0.9, 0.95))
        self.schedule = Schedule(self.total_steps, self.warmup, self.peak_lr, cfg.min_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.saved_step: int | None = None
        # What a resumed run must share with its checkpoint: the base's architecture, the data
        # file's bytes, the data as tokenized (which the tokenizer decides), and the images.
        self.fingerprints = {"base": _sha256(json.dumps(_base_args(model.args), sort_keys=True).encode()),
                             "tokens": _examples_sha256(dataset)}
        if data_file is not None and Path(data_file).is_file():
            self.fingerprints["data"] = file_sha256(data_file)
        if hasattr(dataset, "images_sha256"):  # the multi-modal data: its encoder and image files
            self.fingerprints["images"] = dataset.images_sha256

    def _amp_dtype(self) -> torch.dtype | None:
        return amp_dtype_for(self.cfg.precision, self.device)

    def _wrap(self, model: LLaMAAdapter) -> torch.nn.Module:
        model.to(self.device)
        if not self.info.enabled:
            return model
        if self.cfg.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=self.amp_dtype, reduce_dtype=torch.float32) if self.amp_dtype \
                else MixedPrecisionPolicy()
            for layer in model.layers:
                fully_shard(layer, mp_policy=mp)
            return fully_shard(model, mp_policy=mp)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    # -- state ----------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors on the CPU, whole (gathered from every process under FSDP,
        which every process must call together)."""
        if self.cfg.strategy == "fsdp" and self.info.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            return get_model_state_dict(self.model, options=opts)
        return {n: p.detach().cpu().clone() for n, p in self.named_trainable}

    def _optimizer_state(self) -> dict:
        if self.cfg.strategy == "fsdp" and self.info.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def save_checkpoint(self, rng: list[dict]) -> None:
        """Everything a bit-identical resume needs, in one file written atomically."""
        trainable = self.trainable_state()
        optim = self._optimizer_state()
        if not self.info.main:
            return
        if not all(torch.isfinite(t).all() for t in trainable.values()):
            raise ValueError(f"step {self.step}: the trainable weights are no longer finite (training diverged: "
                             f"lower --lr?); {self._last_good()}")
        state = {
            "step": self.step, "trainable": trainable, "optimizer": optim, "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng, "world_size": self.info.world_size,
            "global_batch": self.global_batch, "samples_seen": self.step * self.global_batch,
            "config": dataclasses.asdict(self.cfg), "adapter": self.module.args.adapter_config(),
            "fingerprints": self.fingerprints, "metadata": {**self.metadata, "step": str(self.step)},
        }
        atomic_write(self.out / CHECKPOINT, lambda tmp: torch.save(state, tmp))
        self.saved_step = self.step

    def _last_good(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written, and no adapter"
        return f"the last good checkpoint (step {self.saved_step}) stays in {self.out / CHECKPOINT}"

    def load_checkpoint(self, path: Path, state: dict | None = None) -> None:
        """Continue the checkpoint at `path` (its `state` where the caller has read it)."""
        state = state if state is not None else read_checkpoint(path)
        check_resume_settings(state, path, self.cfg, self.global_batch, self.module.args.adapter_config(),
                              self.fingerprints)
        if self.cfg.strategy == "fsdp" and self.info.enabled:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            # A checkpoint written without FSDP keys its optimizer state by parameter number,
            # which FSDP's loader cannot map (the other way round works).
            groups = state["optimizer"].get("param_groups", [])
            if any(isinstance(p, int) for g in groups for p in g.get("params", [])):
                raise ValueError(f"resume: {path} was written without FSDP, and its optimizer state does not load "
                                 f"under --strategy fsdp: resume it with --strategy ddp (or in one process)")
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
            set_model_state_dict(self.model, state["trainable"], options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            own = dict(self.named_trainable)
            if set(state["trainable"]) != set(own):
                raise ValueError(f"resume: {path} holds other trainable tensors than this model "
                                 f"(different --adapter-layers or trainable set?)")
            for n, t in state["trainable"].items():
                if t.shape != own[n].shape:
                    raise ValueError(f"resume: {path} holds {n} of shape {tuple(t.shape)}, this model has "
                                     f"{tuple(own[n].shape)} (different --adapter-len or --scalar-gate?)")
            with torch.no_grad():
                for n, t in state["trainable"].items():
                    own[n].copy_(t)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] or not self.scaler.is_enabled():  # a run that turns fp16 on starts a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        if state["step"] > self.total_steps:
            raise ValueError(f"resume: {path} is at step {state['step']}, past the {self.total_steps} steps of this "
                             f"run (--max-steps, --epochs): ask for more steps to continue it")
        self.step = self.saved_step = state["step"]
        # The optimizer's state dict brought back the saved peak rate and weight decay: this
        # run's settings rule from here on (the same values when nothing changed).
        for group, decay in zip(self.optimizer.param_groups, (self.cfg.weight_decay, 0.0), strict=True):
            group["initial_lr"] = self.peak_lr
            group["weight_decay"] = decay
        # The schedule follows this run's settings (a resumed run may train for more steps);
        # with unchanged settings this is exactly the saved learning rate. (load_state_dict
        # has overwritten the old schedule object's fields with the saved ones: make a new one.)
        self.schedule = Schedule(self.total_steps, self.warmup, self.peak_lr, self.cfg.min_lr)
        self.scheduler.lr_lambdas = [self.schedule] * len(self.optimizer.param_groups)
        self.scheduler.base_lrs = [self.peak_lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.schedule(self.step)
        rng = state["rng"]
        if len(rng) == self.info.world_size:
            set_rng_state(rng[self.info.rank])

    def _gather_rng(self) -> list[dict]:
        own = rng_state()
        if not self.info.enabled:
            return [own]
        everyone: list = [None] * self.info.world_size
        dist.all_gather_object(everyone, own)
        return everyone

    # -- one step ---------------------------------------------------------------------------

    def _micro_batches(self) -> list[dict[str, Any]]:
        """This process's micro-batches of the step. Both modes take the same records (the
        step's slice of the data order for this process); padded mode right-pads them in
        grad_accum groups of batch_size, packed mode concatenates them into packs of at
        most pack_tokens tokens. Each batch carries its count of real (non-padding) tokens."""
        cfg, info = self.cfg, self.info
        indices = step_indices(self.step, len(self.dataset), self.global_batch, cfg.seed)
        groups = []
        for a in range(cfg.grad_accum):
            lo = (a * info.world_size + info.rank) * cfg.batch_size
            groups.append([self.dataset[i] for i in indices[lo:lo + cfg.batch_size]])
        if not self.pack:
            batches = [dict(collate(items, self.tokenizer.pad_id), real_tokens=_real_tokens(items)) for items in groups]
        else:
            items = [item for group in groups for item in group]
            packs = pack_records([item["tokens"].numel() for item in items], self.pack_tokens)
            packed = [[items[j] for j in pack] for pack in packs]
            batches = [dict(collate_packed(group), real_tokens=_real_tokens(group)) for group in packed]
            if info.enabled:
                # Every process runs as many micro-batches (forwards and backwards are
                # collectives under FSDP): fill up with one-token batches that carry no loss,
                # first, so that the last (gradient-synchronizing) one is a real pack.
                most = all_reduce_max(len(batches), self.device)
                empty = {"tokens": torch.tensor([self.tokenizer.pad_id]), "labels": torch.tensor([IGNORE_INDEX])}
                batches = [dict(collate_packed([empty]), real_tokens=0) for _ in range(most - len(batches))] + batches
        return [{k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                for b in batches]

    def train_step(self, callback: Callable[[str, int], None] | None = None,
                   record: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
        """One optimizer step over one global batch; returns its metrics. The update and `record(metrics)` form
        one unit that a Ctrl-C waits for, so a checkpoint never pairs one step's counter with another's weights."""
        stats = self._compute_gradients(callback)
        with sigint_deferred():
            self._apply_update(callback)
            if record is not None:
                record(stats)
        return stats

    def _compute_gradients(self, callback: Callable[[str, int], None] | None) -> dict[str, float]:
        """Forward and backward over the micro-batches, then unscaling and clipping: the
        gradients of the next update. Raises a ValueError, before any weight changes, when
        the loss or the gradient is not finite."""
        cfg, info = self.cfg, self.info
        micro = self._micro_batches()
        counts = torch.tensor([float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)),
                               float(sum(b["real_tokens"] for b in micro)),
                               float(sum(int(b["tokens"].numel()) for b in micro))], dtype=torch.float64)
        counts = all_reduce_sum(counts.to(self.device), info).cpu()
        target_tokens, real_tokens, computed_tokens = max(counts[0].item(), 1.0), counts[1].item(), counts[2].item()
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else \
            contextlib.nullcontext()
        for i, batch in enumerate(micro):
            if callback is not None:
                callback("micro_step", i)
            last = i == len(micro) - 1
            sync = contextlib.nullcontext()
            if info.enabled and not last:
                if cfg.strategy == "ddp":
                    sync = self.model.no_sync()
                else:
                    self.model.set_requires_gradient_sync(False)
            elif info.enabled and cfg.strategy == "fsdp":
                self.model.set_requires_gradient_sync(True)
            with sync:
                with autocast:
                    # Keys beside tokens and labels (packing, image features) are model inputs too.
                    inputs = {k: v for k, v in batch.items() if k not in ("tokens", "labels", "real_tokens")}
                    logits = self.model(batch["tokens"], **inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
                # Data-parallel wrappers average gradients over processes: scale by the
                # world size so that the result is the sum over the global batch divided
                # by its number of target tokens.
                self.scaler.scale(loss * (info.world_size / target_tokens)).backward()
            loss_sum += loss.detach()
        loss_total = all_reduce_sum(loss_sum, info).item() / target_tokens
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        # With float16 loss scaling an infinite gradient is routine: the scaler skips that
        # update and lowers the scale. Anywhere else it means the run has diverged.
        bad = [f"the loss is {loss_total}"] if not math.isfinite(loss_total) else []
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            bad.append(f"the gradient norm is {grad_norm}")
        if bad:
            raise ValueError(f"step {self.step + 1}: {' and '.join(bad)} (training diverged: lower --lr?); stopped "
                             f"before the update: {self._last_good()}")
        return {"loss": loss_total, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                "target_tokens": target_tokens, "real_tokens": real_tokens,
                "padding": 1.0 - real_tokens / max(computed_tokens, 1.0)}

    def _apply_update(self, callback: Callable[[str, int], None] | None) -> None:
        """The optimizer step and everything that names it (scaler, schedule, step counter).
        Callers hold Ctrl-C back around it (sigint_deferred), so that a checkpoint never pairs
        one step's counter with another step's weights."""
        self.scaler.step(self.optimizer)
        if callback is not None:
            callback("optimizer_step", self.step + 1)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    # -- the run ----------------------------------------------------------------------------

    def _gate_summary(self) -> float | None:
        gates = [p for n, p in self.named_trainable if n.endswith(".gate")]
        if not gates or (self.cfg.strategy == "fsdp" and self.info.enabled):
            return None
        return float(torch.stack([g.detach().float().abs().mean() for g in gates]).mean())

    def run(self, resume: Path | None = None, save_final: Callable[[], Path | None] | None = None,
            callback: Callable[[str, int], None] | None = None, checkpoint: dict | None = None) -> TrainResult:
        """Train to the last step; `resume`: a checkpoint to continue (`checkpoint`: its
        contents, where the caller has read them)."""
        from tqdm.auto import tqdm

        cfg, info = self.cfg, self.info
        metrics_path = self.out / METRICS
        if resume is not None:
            self.load_checkpoint(resume, checkpoint)
        elif info.main:
            check_fresh_out(cfg)
            self.out.mkdir(parents=True, exist_ok=True)
            for name in (METRICS, CHECKPOINT, PLOT, ADAPTER):  # nothing of an earlier run stays
                (self.out / name).unlink(missing_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        resumed_at = self.step
        if info.enabled:
            dist.barrier()
        if resume is not None and info.main and metrics_path.exists():
            # Drop the metrics of steps after the checkpoint: they will be run again.
            kept = "".join(json.dumps(r) + "\n" for r in read_metrics(metrics_path) if r["step"] <= self.step)
            atomic_write(metrics_path, lambda tmp: Path(tmp).write_text(kept))

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and info.main),
                   desc=self.bar_label, dynamic_ncols=True, leave=True)
        history: list[dict] = []
        start_time = time.perf_counter()
        window = {"tokens": 0.0, "start": time.perf_counter(), "tokens_per_s": 0.0}
        total_tokens = 0.0
        rng_at_step = self._gather_rng() if not info.enabled else None

        def record(stats: dict[str, float]) -> None:
            # The step's metrics row and the random state after it, with the update.
            nonlocal total_tokens, rng_at_step
            window["tokens"] += stats["real_tokens"]  # real tokens: padding not counted
            total_tokens += stats["real_tokens"]
            now = time.perf_counter()
            window["tokens_per_s"] = window["tokens"] / max(now - window["start"], 1e-9)
            row = {"step": self.step, "epoch": self.step * self.global_batch / len(self.dataset),
                   "loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                   "tokens": int(stats["real_tokens"]), "padding": round(stats["padding"], 4),
                   "tokens_per_s": round(window["tokens_per_s"], 1), "elapsed_s": round(now - start_time, 3)}
            gate = self._gate_summary()
            if gate is not None:
                row["gate_abs_mean"] = gate
            history.append(row)
            if info.main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            if not info.enabled:
                rng_at_step = self._gather_rng()

        try:
            while self.step < self.total_steps:
                stats = self.train_step(callback, record)
                tokens_per_s = window["tokens_per_s"]
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}",
                                    pad=f"{stats['padding']:.0%}", refresh=False)
                    window["tokens"], window["start"] = 0.0, time.perf_counter()
                bar.update(1)
                if cfg.print_every and info.main and (self.step % cfg.print_every == 0 or self.step == 1
                                                      or self.step == self.total_steps):
                    bar.write(f"  step {self.step:4d}/{self.total_steps}  loss {stats['loss']:.4f}  "
                              f"lr {stats['lr']:.2e}  {tokens_per_s:,.0f} tokens/s  padding {stats['padding']:.0%}")
                if self.step % cfg.save_every == 0 or self.step == self.total_steps:
                    self.save_checkpoint(self._gather_rng())
                    if save_final is not None and self.step != self.total_steps:
                        save_final()
                if callback is not None:
                    callback("step", self.step)
        except KeyboardInterrupt:
            # Keep the last completed step (a single process only: others may be stuck in a
            # collective), then stop.
            if not info.enabled and self.step > 0:
                self.optimizer.zero_grad(set_to_none=True)
                self.save_checkpoint(rng_at_step)
                bar.write(f"interrupted: checkpoint of step {self.step} in {self.out / CHECKPOINT}; "
                          f"continue with --resume")
            raise
        finally:
            bar.close()
        seconds = time.perf_counter() - start_time
        adapter_path = save_final() if save_final is not None else None
        losses = [r["loss"] for r in history] or [float("nan")]
        return TrainResult(steps=self.step, resumed_at=resumed_at, final_loss=losses[-1], first_loss=losses[0],
                           out_dir=self.out,
                           adapter_path=adapter_path, plot_path=None, seconds=seconds,
                           tokens_per_s=total_tokens / max(seconds, 1e-9), history=history)
