"""Result files: CSV written whole (atomically) or a row at a time, markdown tables, and a
bar chart (matplotlib optional: without it there is no PNG, and the CSV and markdown stay)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] = ()) -> Path:
    """Write rows (dicts) with `columns` first, then any other keys in order of appearance.

    The file is written to a temporary name and renamed, so a run killed while writing leaves
    the previous complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(columns)
    for row in rows:
        header.extend(k for k in row if k not in header)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in header})
    os.replace(tmp, path)
    return path


class RowLog:
    """A CSV file that grows a row at a time, each row flushed as it is written, so that a run
    stopped at any point keeps every finished row. Several processes may append to one file
    (each write holds an exclusive lock; whoever finds the file empty writes the header).

    `fixed` fields (the environment) go into every row; keys outside `columns` are dropped.
    With path None the rows are only kept in memory (`rows`)."""

    def __init__(self, path: str | os.PathLike | None, columns: Sequence[str], fixed: dict | None = None,
                 fresh: bool = True):
        self.path = Path(path) if path is not None else None
        self.columns = list(columns)
        self.fixed = dict(fixed or {})
        self.rows: list[dict] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                self.path.unlink(missing_ok=True)

    def write(self, row: dict) -> None:
        import fcntl

        row = {**self.fixed, **row}
        self.rows.append(row)
        if self.path is None:
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow({k: _csv_value(row.get(k)) for k in self.columns})
            f.flush()


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def as_float(value: object) -> float | None:
    """A CSV cell as a float, or None when it is empty or not a number."""
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table of already formatted cells."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot with the file backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def bar_plot(path: Path, labels: Sequence[str], values: Sequence[float], ylabel: str, title: str,
             low: Sequence[float] | None = None, high: Sequence[float] | None = None) -> Path | None:
    """Bars of `values` (with whiskers from `low` to `high` where given) as a PNG; None
    without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    errors = None
    if low is not None and high is not None:
        errors = [[v - lo for v, lo in zip(values, low, strict=True)],
                  [hi - v for v, hi in zip(values, high, strict=True)]]
    colors = ["#999999", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"][: len(values)]
    ax.bar(labels, values, yerr=errors, color=colors, capsize=4)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
