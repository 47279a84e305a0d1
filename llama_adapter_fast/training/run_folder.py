"""The run folder of a training run: its files (checkpoint, adapter, metrics, loss plot),
the lock that keeps two runs out of one folder, checkpoints and metrics read back, the
random state a bit-identical resume restores, and Ctrl-C held back around a step."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import torch

from llama_adapter_fast.files import atomic_write, first_line
from llama_adapter_fast.training.config import RESUME_FIXED, TrainConfig, option_name

CHECKPOINT = "checkpoint.pt"
ADAPTER = "adapter.safetensors"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
LOCK = ".lock"
CHECKPOINT_KEYS = ("step", "trainable", "optimizer", "scheduler", "scaler", "rng", "global_batch", "config")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint of this package, or a ValueError naming the file (missing,
    empty, truncated, corrupt, or something else)."""
    path = Path(path)
    if not path.is_file():
        return checkpoint_state(path, None)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        return checkpoint_state(path, exc)
    return checkpoint_state(path, loaded)


def checkpoint_state(path: Path, loaded: object) -> dict[str, Any]:
    """What torch.load gave for `path` (or the exception it raised; None where `path` is
    no file) as a training checkpoint, or a ValueError naming the file."""
    if path.is_dir():
        raise ValueError(f"resume: {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise ValueError(f"resume: checkpoint {path} does not exist")
    if isinstance(loaded, Exception):
        raise ValueError(f"resume: {path} cannot be read ({first_line(loaded)}): an empty, truncated or corrupt "
                         f"checkpoint (start again with --overwrite)")
    missing = [k for k in CHECKPOINT_KEYS if k not in loaded] if isinstance(loaded, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise ValueError(f"resume: {path} is not a training checkpoint of llama-adapter-fast (no {missing[0]!r})")
    return loaded


def check_fresh_out(cfg: TrainConfig) -> None:
    if (Path(cfg.out_dir) / CHECKPOINT).exists() and not cfg.overwrite:
        raise ValueError(f"--out {cfg.out_dir} already holds a training checkpoint: pass --resume to continue "
                         f"it or --overwrite to start again")


def resolve_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume is True or cfg.resume == "auto":
        path = Path(cfg.out_dir) / CHECKPOINT
        if cfg.resume == "auto" and not path.exists():
            return None
        return path
    if cfg.resume:
        return Path(cfg.resume)
    return None


def check_resume_settings(state: dict, path: Path, cfg: TrainConfig, global_batch: int,
                          adapter_now: dict[str, Any], fingerprints_now: dict[str, str]) -> None:
    """Refuse a resumed run whose settings, model or data cannot continue the checkpoint
    `state` (read from `path`)."""
    saved, now = state["config"], dataclasses.asdict(cfg)

    def refuse(option: str, old: Any, new: Any, why: str) -> ValueError:
        return ValueError(f"resume: {option} was {old!r} for {path}, this run has {new!r}: {why}; keep it, or "
                          f"start a new run (another --out, or --overwrite)")

    if state["global_batch"] != global_batch:
        raise ValueError(f"resume: {path} was written with a global batch of {state['global_batch']} "
                         f"records, this run has {global_batch} (--batch-size * --grad-accum * processes); "
                         f"the data order would differ")
    for name in RESUME_FIXED:
        if name in saved and saved[name] != now[name]:
            raise refuse(option_name(name), saved[name], now[name], RESUME_FIXED[name])
    saved_adapter, adapter_now = _with_v2_fields(state.get("adapter", {})), _with_v2_fields(adapter_now)
    for name in sorted(set(saved_adapter) | set(adapter_now)):
        old = saved_adapter.get(name)
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
        if name in fingerprints and name in fingerprints_now and fingerprints[name] != fingerprints_now[name]:
            raise ValueError("resume: " + why.format(path=path, data=cfg.data) + "; a resumed run must see "
                             "what the checkpoint saw (start a new run: another --out, or --overwrite)")


def _with_v2_fields(adapter: dict[str, Any]) -> dict[str, Any]:
    """An adapter config with V2's fields spelled out (a config records them only where the
    adapter uses them); the scale's placement matters only where a layer has a bias."""
    adapter = {"bias_tuning": [], "norm_tuning": False, "prefix_projection": "own", **adapter}
    if not adapter["bias_tuning"]:
        adapter.pop("scale_tuning", None)
    return adapter


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


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
