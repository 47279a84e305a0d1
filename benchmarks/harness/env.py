"""What produced a result: the device and the library versions, and the names of result
files (`<device>-<date>`)."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# Columns that describe the machine; every CSV row carries them so a file stands alone.
ENV_COLUMNS = ("device", "device_name", "torch", "triton", "cuda", "cudnn", "date")


def package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """What produced a result: the device, its name and the library versions."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({torch.get_num_threads()} threads)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda or "",
        "cudnn": str(cudnn) if cudnn else "",
        "date": datetime.date.today().isoformat(),
    }


def extra_environment() -> dict[str, str]:
    """Versions printed in the logs but not repeated in every CSV row."""
    info = {
        "python": platform.python_version(),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "commit": "",
    }
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_stem(env: dict[str, str]) -> str:
    """File name stem of a run: the device and the date, e.g. ``nvidia-h100-80gb-hbm3-2026-11-27``
    or ``cpu-2026-11-27``."""
    device = slug(env["device_name"]) if env["device"] == "cuda" else "cpu"
    return f"{device}-{env['date']}"


def format_environment(env: dict[str, str]) -> str:
    parts = [env["device_name"], f"torch {env['torch']}"]
    if env.get("triton"):
        parts.append(f"triton {env['triton']}")
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    if env.get("cudnn"):
        parts.append(f"cuDNN {env['cudnn']}")
    return ", ".join(parts)
