"""Fine-tuning LLaMA-Adapter (and pretraining a small base model for the demo).

One training loop serves both: AdamW with betas (0.9, 0.95) and weight decay on matrices
only (the original's timm rule: none on gates and other 1-d tensors), linear warmup then a
half-cosine decay (the original's schedule), gradient accumulation, gradient clipping,
bf16/fp16 autocast on a GPU, a tqdm progress bar with loss and tokens/s, metrics as JSON
Lines, checkpoints written atomically, exact resume, and a loss plot at the end.

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
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama_adapter_fast.attention import triton_dtype_problem
from llama_adapter_fast.data import IGNORE_INDEX, InstructionDataset, TextDataset, collate, collate_packed, pack_records
from llama_adapter_fast.model import ADAPTER_FIELDS, LLaMAAdapter, ModelArgs, atomic_write, file_sha256, first_line
from llama_adapter_fast.tokenizer import Tokenizer

CHECKPOINT = "checkpoint.pt"
ADAPTER = "adapter.safetensors"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Settings of `finetune` (the command line's options, with the same names)."""

    base: str | None = None  # Hugging Face folder (config.json) or Meta folder (params.json)
    data: str | None = None  # Alpaca JSON / JSON Lines
    out_dir: str = "runs/adapter"
    tokenizer: str | None = None  # default: the base folder's tokenizer.model, else the bundled one
    adapter_len: int = 10
    adapter_layers: int | None = None  # default min(30, n_layers)
    gate_activation: str = "tanh"
    scalar_gate: bool = False
    attention_backend: str = "auto"
    max_seq_len: int = 512
    batch_size: int = 4  # records per process and micro-step (padded); with pack, per process and step / grad_accum
    pack: bool = True  # concatenate records without padding (packed attention) instead of right-padding them
    pack_tokens: int | None = None  # tokens per packed micro-batch; default batch_size * max_seq_len
    grad_accum: int = 1
    epochs: float = 5.0
    max_steps: int | None = None  # overrides epochs
    lr: float | None = None  # default blr * global batch / 256, as the original
    blr: float = 9e-3
    min_lr: float = 0.0
    weight_decay: float = 0.02
    warmup_steps: int | None = None  # default 10% of the steps
    clip_grad: float = 1.0  # 0 disables
    precision: str = "auto"  # auto: bf16 (fp16 where bf16 is missing) on a GPU, fp32 on the CPU
    dtype: str | None = None  # cast the base weights (float32, bfloat16, float16)
    seed: int = 0
    log_every: int = 1
    print_every: int = 0  # also print a line of metrics every so many steps (0: the progress bar only)
    save_every: int = 100  # steps between checkpoints (and one at the end)
    resume: str | bool = False  # True: out_dir's checkpoint; a path: that checkpoint
    overwrite: bool = False
    strategy: str = "ddp"
    device: str | None = None
    progress: bool = True
    plot: bool = True
    # The multi-modal adapter (llama_adapter_fast.multimodal): a CLIP vision folder turns it on.
    image_encoder: str | None = None
    image_layers: list[int] | None = None  # encoder layers whose global features are used (default: 4 evenly spaced)
    projection_hidden: int | None = None  # hidden width of the image projection (default: the model width)
    feature_cache: str | None = None  # encoder features on disk (default: out_dir/image_features)

    def validate(self, world_size: int = 1) -> None:
        """Raise a ValueError naming the option (as the command line spells it) of a setting
        out of range."""
        for name in ("batch_size", "grad_accum", "max_seq_len", "log_every", "save_every", "adapter_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option_name(name)} must be a positive int, got {value!r}")
        if self.pack_tokens is not None and (isinstance(self.pack_tokens, bool) or not isinstance(self.pack_tokens, int)
                                             or self.pack_tokens < 1):
            raise ValueError(f"--pack-tokens must be a positive int, got {self.pack_tokens!r}")
        for name in ("adapter_layers", "warmup_steps", "print_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{option_name(name)} must be an int >= 0, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        for name in ("epochs", "lr", "blr", "min_lr", "weight_decay", "clip_grad"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{option_name(name)} must be a finite number, got {value}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("blr", "weight_decay", "min_lr", "clip_grad"):
            if getattr(self, name) < 0:
                raise ValueError(f"{option_name(name)} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.lr is None and not self.blr > 0:
            raise ValueError(f"--blr must be > 0 (or give --lr), got {self.blr}")
        if self.peak_lr(world_size) > MAX_LR:
            raise ValueError(f"--lr {self.peak_lr(world_size):g} is beyond {MAX_LR:g}: AdamW's first step divides it "
                             f"by 1 - 0.9 in float32, which overflows")
        if self.min_lr > self.peak_lr(world_size):
            peak = f"--lr {self.lr}" if self.lr is not None else \
                f"the learning rate {self.peak_lr(world_size):.3g} (--blr * global batch / 256)"
            raise ValueError(f"--min-lr {self.min_lr} is above {peak}: the schedule decays from the peak to --min-lr")

    def peak_lr(self, world_size: int = 1) -> float:
        """--lr, or by default --blr * global batch / 256 (the original's rule)."""
        if self.lr is not None:
            return self.lr
        return self.blr * self.batch_size * self.grad_accum * world_size / 256


def option_name(field: str) -> str:
    """The command-line option of a TrainConfig field."""
    return "--out" if field == "out_dir" else "--" + field.replace("_", "-")


MAX_LR = 1e37  # AdamW's bias correction divides the rate by 1 - beta1 = 0.1 in float32 (max 3.4e38)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------
# Distributed set-up


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs,
    gloo on CPUs. Returns the ranks and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device is None:
        device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device of a --device option (None: cuda where there is one, else cpu), checked
    by allocating on it, so that a typo or a missing GPU is a clear error up front."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N, ...)") from None
    if dev.type == "meta":
        raise ValueError("--device meta holds no data: use cpu or cuda")
    try:
        torch.empty(0, device=dev)
    except Exception as exc:  # each backend fails its own way (AssertionError, RuntimeError, ...)
        raise ValueError(f"--device {name}: not available on this machine ({first_line(exc)})") from None
    return dev


def _real_tokens(items: list[dict[str, torch.Tensor]]) -> int:
    return sum(item["tokens"].numel() for item in items)


def _all_reduce_max(value: int, device: torch.device) -> int:
    x = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def _all_reduce_sum(x: torch.Tensor, info: Dist) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# ----------------------------------------------------------------------------------------
# Pieces of the loop


def base_format(path: str | os.PathLike) -> str:
    """"hf" for a Hugging Face folder (config.json), "meta" for Meta's (params.json)."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return "hf"
    if (folder / "params.json").is_file():
        return "meta"
    raise ValueError(f"base: {folder} holds neither config.json (Hugging Face) nor params.json (Meta)")


def load_base(path: str | os.PathLike, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, **adapter: Any) -> LLaMAAdapter:
    """A Hugging Face folder (config.json) or a Meta folder (params.json)."""
    loader = LLaMAAdapter.from_hf if base_format(path) == "hf" else LLaMAAdapter.from_meta
    return loader(Path(path), device=device, dtype=dtype, **adapter)


def load_tokenizer(path: str | None, base: str | None) -> Tokenizer:
    """`path` if given, else the base folder's tokenizer.model, else (no base) the bundled one."""
    if path is not None:
        return Tokenizer(path)
    if base is None:
        return Tokenizer()
    if not (Path(base) / "tokenizer.model").is_file():
        raise ValueError(f"base: {base} has no tokenizer.model: pass the base model's sentencepiece tokenizer "
                         f"with --tokenizer")
    return Tokenizer(Path(base) / "tokenizer.model")


def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a --precision on a device (None: no autocast)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_attention_dtype(backend: str, device: torch.device, dtype: torch.dtype | None, option: str) -> None:
    """Refuse, before anything loads or trains, a dtype that --attention-backend triton
    cannot compute correctly on this device (bfloat16 under Triton's interpreter)."""
    if backend != "triton" or dtype is None or triton_dtype_problem(device, dtype) is None:
        return
    raise ValueError(f"{option} with --attention-backend triton cannot run on {device}: Triton's interpreter has "
                     f"no {str(dtype).removeprefix('torch.')} arithmetic (the results would be wrong); use "
                     f"--attention-backend sdpa there, or float32")


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak`, then half a cosine down to `floor` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class Schedule:
    """LambdaLR factor (a class, not a lambda, so that the scheduler's state saves)."""

    def __init__(self, total: int, warmup: int, peak: float, floor: float):
        self.total, self.warmup, self.peak, self.floor = total, warmup, peak, floor

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total, self.warmup, self.peak, self.floor) / self.peak


def step_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Record indices of one optimizer step: positions [step * G, (step + 1) * G) of the
    endless sequence of per-epoch permutations (each seeded by seed and epoch)."""
    out = []
    pos = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        take = min(global_batch - len(out), n - offset)
        out.extend(perm[offset:offset + take])
        pos += take
    return out


def param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay matrices (the prompts, the base's weights when pretraining), not gates or norms."""
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # As a tensor, so that the checkpoint loads with torch.load(weights_only=True).
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics file. Rows are appended as steps finish, so a run killed mid-write
    can leave its last line torn: that line is dropped (its step runs again on resume); a bad
    line anywhere else is a ValueError naming the file."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not a metrics row ({exc})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}: line {i + 1} is not a metrics row (no step)")
        rows.append(row)
    return rows


def write_loss_plot(metrics_path: str | os.PathLike, out_path: str | os.PathLike, title: str = "training loss",
                    ylabel: str = "cross-entropy") -> Path:
    """Loss per step from a metrics file, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=1, alpha=0.4, label="loss")
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"mean of {k} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out_path


# Settings a resumed run must keep, and why; every other setting may change and is honoured
# from the resumed step on (the adapter's own settings are compared with the model's).
RESUME_FIXED = {
    "seed": "the data order and the initial prompts follow it",
    "max_seq_len": "the records would be truncated differently",
    "image_encoder": "the trained image projection reads this encoder's features",
    "image_layers": "the trained image projection reads these layers' features",
    "projection_hidden": "the trained image projection has this shape",
}
RESUME_UNREPORTED = ("resume", "overwrite", "progress", "plot")
CHECKPOINT_KEYS = ("step", "trainable", "optimizer", "scheduler", "scaler", "rng", "global_batch", "config")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint of this package, or a ValueError naming the file (missing,
    empty, truncated, corrupt, or something else)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"resume: {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise ValueError(f"resume: checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"resume: {path} cannot be read ({first_line(exc)}): an empty, truncated or corrupt "
                         f"checkpoint (start again with --overwrite)") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise ValueError(f"resume: {path} is not a training checkpoint of llama-adapter-fast (no {missing[0]!r})")
    return state


def _shown(value: Any) -> str:
    return "default" if value is None else str(value)


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


@contextlib.contextmanager
def sigint_deferred():
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise KeyboardInterrupt: the
    block runs whole or, if something else fails inside, not past that point. Only the main
    thread receives signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


LOCK = ".lock"


@contextlib.contextmanager
def out_folder_lock(folder: str | os.PathLike):
    """Hold an exclusive lock on an out folder for the life of a run, so that two runs never
    interleave their checkpoints, metrics and adapters; a second run gets a ValueError naming
    the holder. The lock is an flock on folder/.lock (which records the holder's pid and
    host): the system releases it when its process ends, however it ends, so a lock file
    left by a run that died blocks nothing. Creating the folder and the file also checks,
    before anything loads, that the folder is writable."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {folder}: cannot create the folder ({exc.strerror or exc})") from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform
        print(f"warning: no file locking on this platform: nothing stops another run from writing to {folder}")
        yield
        return
    path = folder / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValueError(f"--out {folder} is not writable ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise ValueError(f"--out {folder} is in use by another run ({holder}): wait for it to end or choose "
                             f"another --out") from None
        # The previous holder may have removed the file between our open and our lock:
        # then we hold a lock on a file nobody else sees, so open again.
        try:
            same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding the lock, so that no one locks the old file
        os.close(fd)


# ----------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    first_loss: float
    out_dir: Path
    adapter_path: Path | None
    plot_path: Path | None
    seconds: float
    tokens_per_s: float
    history: list[dict] = dataclasses.field(default_factory=list)


class Trainer:
    """The shared loop. `trainable` selects the parameters that learn ("adapter" or "all");
    `save_final` writes the result (the adapter file, or the base model folder). `data_file`
    is the file the dataset was read from: a resumed run must read the same bytes."""

    def __init__(self, cfg: TrainConfig, model: LLaMAAdapter, dataset, tokenizer: Tokenizer, info: Dist,
                 device: torch.device, trainable: str = "adapter", title: str = "LLaMA-Adapter fine-tuning",
                 ylabel: str = "cross-entropy on response tokens", bar_label: str = "adapter",
                 data_file: str | os.PathLike | None = None, pack: bool | None = None):
        cfg.validate(info.world_size)
        # Packed micro-batches hold the same records as padded ones, without the padding.
        self.pack = cfg.pack if pack is None else pack
        self.pack_tokens = cfg.pack_tokens or cfg.batch_size * cfg.max_seq_len
        self.cfg, self.dataset, self.tokenizer, self.info, self.device = cfg, dataset, tokenizer, info, device
        self.title, self.ylabel, self.bar_label = title, ylabel, bar_label
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
            check_attention_dtype(model.args.attention_backend, device, self.amp_dtype or weights, option)
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

    def _trainable_state(self) -> dict[str, torch.Tensor]:
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
        trainable = self._trainable_state()
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
            "fingerprints": self.fingerprints,
        }
        atomic_write(self.out / CHECKPOINT, lambda tmp: torch.save(state, tmp))
        self.saved_step = self.step

    def _last_good(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written, and no adapter"
        return f"the last good checkpoint (step {self.saved_step}) stays in {self.out / CHECKPOINT}"

    def _check_resume_settings(self, state: dict, path: Path) -> list[str]:
        """Refuse a resumed run whose settings cannot continue the checkpoint's; return the
        changed settings that it honours (as "--option old -> new")."""
        saved, now = state["config"], dataclasses.asdict(self.cfg)

        def refuse(option: str, old: Any, new: Any, why: str) -> ValueError:
            return ValueError(f"resume: {option} was {old!r} for {path}, this run has {new!r}: {why}; keep it, or "
                              f"start a new run (another --out, or --overwrite)")

        if state["global_batch"] != self.global_batch:
            raise ValueError(f"resume: {path} was written with a global batch of {state['global_batch']} "
                             f"records, this run has {self.global_batch} (--batch-size * --grad-accum * processes); "
                             f"the data order would differ")
        for name in RESUME_FIXED:
            if name in saved and saved[name] != now[name]:
                raise refuse(option_name(name), saved[name], now[name], RESUME_FIXED[name])
        adapter_now = self.module.args.adapter_config()
        for name, old in state.get("adapter", {}).items():
            if adapter_now.get(name) != old:
                raise refuse(option_name(name), old, adapter_now.get(name), "the trained adapter has this shape and "
                             "meaning")
        fingerprints = state.get("fingerprints", {})
        for name, why in (("base", "--base: the base model's architecture differs from the one {path} was "
                                   "trained on"),
                          ("data", "--data: {data} holds other records than the file {path} was trained on"),
                          ("tokens", "--tokenizer: the records tokenize differently than when {path} was written "
                                     "(another tokenizer?)"),
                          ("images", "--image-encoder or the pictures: the image features would differ from those "
                                     "{path} was trained on (other encoder weights, or changed image files)")):
            if name in fingerprints and name in self.fingerprints and fingerprints[name] != self.fingerprints[name]:
                raise ValueError("resume: " + why.format(path=path, data=self.cfg.data) + "; a resumed run must see "
                                 "what the checkpoint saw (start a new run: another --out, or --overwrite)")
        honoured = []
        for name, value in now.items():
            if name in RESUME_UNREPORTED or name in RESUME_FIXED or name in adapter_now or name not in saved:
                continue
            if saved[name] != value:
                honoured.append(f"{option_name(name)} {_shown(saved[name])} -> {_shown(value)}")
        return honoured

    def load_checkpoint(self, path: Path) -> None:
        state = read_checkpoint(path)
        honoured = self._check_resume_settings(state, path)
        if honoured and self.info.main:
            print(f"resume: honouring changed settings: {', '.join(honoured)}")
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
            _set_rng_state(rng[self.info.rank])

    def _gather_rng(self) -> list[dict]:
        own = _rng_state()
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
                most = _all_reduce_max(len(batches), self.device)
                empty = {"tokens": torch.tensor([self.tokenizer.pad_id]), "labels": torch.tensor([IGNORE_INDEX])}
                batches = [dict(collate_packed([empty]), real_tokens=0) for _ in range(most - len(batches))] + batches
        return [{k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                for b in batches]

    def train_step(self, callback: Callable[[str, int], None] | None = None) -> dict[str, float]:
        """One optimizer step over one global batch; returns its metrics."""
        stats = self._compute_gradients(callback)
        with sigint_deferred():
            self._apply_update(callback)
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
        counts = _all_reduce_sum(counts.to(self.device), info).cpu()
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
        loss_total = _all_reduce_sum(loss_sum, info).item() / target_tokens
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
            callback: Callable[[str, int], None] | None = None) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, info = self.cfg, self.info
        metrics_path = self.out / METRICS
        if resume is not None:
            self.load_checkpoint(resume)
        elif info.main:
            _check_fresh_out(cfg)
            self.out.mkdir(parents=True, exist_ok=True)
            for name in (METRICS, CHECKPOINT, PLOT, ADAPTER):  # nothing of an earlier run stays
                (self.out / name).unlink(missing_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if info.enabled:
            dist.barrier()
        if resume is not None and info.main and metrics_path.exists():
            # Drop the metrics of steps after the checkpoint: they will be run again.
            kept = "".join(json.dumps(r) + "\n" for r in read_metrics(metrics_path) if r["step"] <= self.step)
            atomic_write(metrics_path, lambda tmp: Path(tmp).write_text(kept))

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and info.main),
                   desc=self.bar_label, dynamic_ncols=True,
                   leave=True)
        history: list[dict] = []
        start_time = time.perf_counter()
        window_tokens, window_start = 0.0, time.perf_counter()
        total_tokens = 0.0
        rng_at_step = self._gather_rng() if not info.enabled else None
        try:
            while self.step < self.total_steps:
                stats = self._compute_gradients(callback)
                # The update, its step number, its metrics row and the random state after it
                # form one unit: a Ctrl-C inside waits for the unit to end.
                with sigint_deferred():
                    self._apply_update(callback)
                    # Real tokens: what the records hold, padding not counted.
                    window_tokens += stats["real_tokens"]
                    total_tokens += stats["real_tokens"]
                    now = time.perf_counter()
                    tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                    row = {"step": self.step, "epoch": self.step * self.global_batch / len(self.dataset),
                           "loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                           "tokens": int(stats["real_tokens"]), "padding": round(stats["padding"], 4),
                           "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(now - start_time, 3)}
                    gate = self._gate_summary()
                    if gate is not None:
                        row["gate_abs_mean"] = gate
                    history.append(row)
                    if info.main:
                        with open(metrics_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps(row) + "\n")
                    if not info.enabled:
                        rng_at_step = self._gather_rng()
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}",
                                    pad=f"{stats['padding']:.0%}", refresh=False)
                    window_tokens, window_start = 0.0, now
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
        plot_path = None
        if cfg.plot and info.main and metrics_path.exists():
            plot_path = write_loss_plot(metrics_path, self.out / PLOT, title=self.title, ylabel=self.ylabel)
        losses = [r["loss"] for r in history] or [float("nan")]
        return TrainResult(steps=self.step, final_loss=losses[-1], first_loss=losses[0], out_dir=self.out,
                           adapter_path=adapter_path, plot_path=plot_path, seconds=seconds,
                           tokens_per_s=total_tokens / max(seconds, 1e-9), history=history)


def _check_fresh_out(cfg: TrainConfig) -> None:
    if (Path(cfg.out_dir) / CHECKPOINT).exists() and not cfg.overwrite:
        raise ValueError(f"--out {cfg.out_dir} already holds a training checkpoint: pass --resume to continue "
                         f"it or --overwrite to start again")


def _resolve_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume is True or cfg.resume == "auto":
        path = Path(cfg.out_dir) / CHECKPOINT
        if cfg.resume == "auto" and not path.exists():
            return None
        return path
    if cfg.resume:
        return Path(cfg.resume)
    return None


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


def _finetune(cfg: TrainConfig, info: Dist, device: torch.device, model: LLaMAAdapter | None,
              tokenizer: Tokenizer | None, callback: Callable[[str, int], None] | None) -> TrainResult:
    resume = _resolve_resume(cfg)
    if resume is None and info.main:
        _check_fresh_out(cfg)
    elif resume is not None and not resume.is_file():
        read_checkpoint(resume)  # its error (missing, a folder) before minutes of loading
    # The same seed on every process: FSDP does not broadcast the initial prompts.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if model is None and cfg.base is not None:
        base_format(cfg.base)  # a wrong folder fails before anything loads
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer, cfg.base)
    if model is None:
        if cfg.base is None:
            raise ValueError("base: a base model folder is required (Hugging Face or Meta format)")
        adapter = {"adapter_len": cfg.adapter_len, "gate_activation": cfg.gate_activation,
                   "scalar_gate": cfg.scalar_gate, "attention_backend": cfg.attention_backend}
        if cfg.adapter_layers is not None:
            adapter["adapter_layers"] = cfg.adapter_layers
        model = load_base(cfg.base, dtype=DTYPES[cfg.dtype] if cfg.dtype else None, **adapter)
    if tokenizer.n_words > model.args.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.n_words} tokens, more than the model's "
                         f"vocab_size {model.args.vocab_size}: wrong tokenizer for this base?")
    if cfg.data is None:
        raise ValueError("data: an instruction file is required")
    if cfg.max_seq_len > model.args.max_seq_len and info.main:
        print(f"warning: max_seq_len {cfg.max_seq_len} exceeds the base model's context of {model.args.max_seq_len}")
    if cfg.image_encoder is not None or hasattr(model, "image_encoder"):  # the multi-modal adapter
        from llama_adapter_fast.multimodal import prepare_finetune

        model, dataset = prepare_finetune(cfg, model, tokenizer, progress=cfg.progress and info.main)
    else:
        dataset = InstructionDataset(cfg.data, tokenizer, max_seq_len=cfg.max_seq_len)
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
    trainer = Trainer(cfg, model, dataset, tokenizer, info, device, trainable="adapter", data_file=cfg.data)
    out = Path(cfg.out_dir)

    def save_adapter() -> Path | None:
        # Every process takes part in gathering a sharded adapter; the first one writes.
        state = trainer._trainable_state() if cfg.strategy == "fsdp" and info.enabled else None
        path = out / ADAPTER
        if info.main:
            meta = {"base": str(cfg.base), "step": str(trainer.step)}
            trainer.module.save_adapter(path, metadata=meta, tensors=state)
            return path
        return None

    return trainer.run(resume=resume, save_final=save_adapter, callback=callback)


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
    trainer = Trainer(cfg, model, dataset, tokenizer, info, device, trainable="all",
                      title="base model pretraining", ylabel="cross-entropy", bar_label="base", data_file=text_path,
                      pack=False)
    out = Path(cfg.out_dir)

    def save_base() -> Path | None:
        if not info.main:
            return None
        model.save_hf(out)
        (out / "tokenizer.model").write_bytes(Path(tokenizer.path).read_bytes())
        return out

    with out_folder_lock(cfg.out_dir) if info.main else contextlib.nullcontext():
        result = trainer.run(resume=_resolve_resume(cfg), save_final=save_base)
    model.freeze_base()
    return model, result
