"""Turn benchmark CSVs into PNG plots and a markdown summary.

    python -m benchmarks.harness.report benchmarks/results/<stem>-attention.csv benchmarks/results/<stem>-train-step.csv
    python -m benchmarks.harness.report --readme      # the README section for the newest GPU results

Attention: for each dtype, one figure of time against T and one of TFLOP/s against T, a
panel per (head dim, kv heads) and mode, one line per implementation. Train step: a bar
chart of tokens/s. The markdown file holds the summary table (bf16, D = 128 on a GPU), a
table per configuration, the train-step table and every row that did not run, and names
the device and library versions. Needs matplotlib for the PNGs only.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from benchmarks import harness

MODES = ("fwd", "bwd", "fwd+bwd")


# ----------------------------------------------------------------------------------------
# Reading


def load(paths: Sequence[Path]) -> tuple[list[dict], list[dict]]:
    """Attention rows and train-step rows from any mix of CSV files (other rows, such as
    correctness checks, are left out)."""
    attention, train = [], []
    for path in paths:
        for row in harness.read_csv(path):
            if row.get("bench") == "train_step":
                train.append(row)
            elif row.get("bench") == "attention":
                attention.append(row)
    return attention, train


def impl_label(row: dict) -> str:
    label = row["impl"]
    if row.get("sdpa_backend"):
        label += f" ({row['sdpa_backend']})"
    if row.get("tuning") == "fixed config":
        label += " [fixed config]"
    return label


def config_key(row: dict) -> tuple:
    return row["dtype"], int(row["D"]), int(row["Hq"]), int(row["Hkv"])


def config_title(key: tuple) -> str:
    dtype, D, Hq, Hkv = key
    return f"{dtype}, D={D}, {Hq} q heads / {Hkv} kv heads"


def _impl_order(label: str) -> tuple:
    for i, prefix in enumerate(("fused", "fused-previous", "two-sdpa", "flex", "eager", "sdpa floor")):
        if label.startswith(prefix):
            return i, label
    return 9, label


def measured(rows: Sequence[dict]) -> list[dict]:
    """Rows with a time (ok, or flagged as a mismatch)."""
    return [r for r in rows if harness.as_float(r.get("ms")) is not None]


def _ms(row: dict | None) -> float | None:
    return harness.as_float(row.get("ms")) if row else None


def index(rows: Sequence[dict]) -> dict:
    """(config, T, label, mode) -> row."""
    return {(config_key(r), int(r["T"]), impl_label(r), r["mode"]): r for r in measured(rows)}


def headline_configs(rows: Sequence[dict]) -> list[tuple]:
    """The configurations of the summary: bf16 with D = 128 (the speed targets), every kv-head
    count, when present; else the first dtype and head dim measured."""
    keys = sorted({config_key(r) for r in measured(rows)}, key=lambda k: (k[0] != "bf16", -k[1], -k[3]))
    return [k for k in keys if k[:2] == keys[0][:2]] if keys else []


# ----------------------------------------------------------------------------------------
# Plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _no_ticks():
    from matplotlib import ticker

    return ticker.NullLocator()


def _log_y(ax) -> None:
    """Log scale with plain numbers (0.5, 2, 50) at 1, 2 and 5 of each decade."""
    from matplotlib import ticker

    ax.set_yscale("log")
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(plain)


def plot_attention(rows: Sequence[dict], out_dir: Path, stem: str) -> list[Path]:
    """Per dtype: time against T and TFLOP/s against T, one line per implementation."""
    plt = _pyplot()
    rows = measured(rows)
    if plt is None or not rows:
        return []
    written = []
    for dtype in sorted({r["dtype"] for r in rows}):
        subset = [r for r in rows if r["dtype"] == dtype]
        configs = sorted({config_key(r) for r in subset}, key=lambda k: (-k[1], -k[3]))
        env = subset[0]
        for metric, ylabel, log_y in (("ms", "time (ms)", True), ("tflops", "TFLOP/s", False)):
            fig, axes = plt.subplots(len(configs), len(MODES), figsize=(4.2 * len(MODES), 3.2 * len(configs)),
                                     squeeze=False)
            for i, key in enumerate(configs):
                for j, mode in enumerate(MODES):
                    ax = axes[i][j]
                    lines = defaultdict(list)
                    for r in subset:
                        if config_key(r) == key and r["mode"] == mode:
                            value = harness.as_float(r.get(metric))
                            if value is not None:
                                lines[impl_label(r)].append((int(r["T"]), value))
                    for label in sorted(lines, key=_impl_order):
                        points = sorted(lines[label])
                        style = "--" if label.startswith("sdpa floor") else "-"
                        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", ms=3,
                                label=label)
                    ax.set_xscale("log", base=2)
                    seq_lens = sorted({p[0] for points in lines.values() for p in points})
                    if seq_lens:
                        ax.set_xticks(seq_lens, [_short(t) for t in seq_lens])
                        ax.xaxis.set_minor_locator(_no_ticks())
                    if log_y:
                        _log_y(ax)
                    ax.set_title(f"{mode}: {config_title(key)}", fontsize=9)
                    ax.set_xlabel("T (B*T fixed)", fontsize=8)
                    ax.set_ylabel(ylabel, fontsize=8)
                    ax.tick_params(labelsize=7)
                    ax.grid(True, which="both", alpha=0.3)
                    if lines:
                        ax.legend(fontsize=6)
            fig.suptitle(f"gated prefix attention, {dtype}, causal, P={env['P']}: {env['device_name']}, "
                         f"torch {env['torch']}, triton {env['triton']}", fontsize=10)
            fig.tight_layout()
            path = out_dir / f"{stem}-attention-{'time' if metric == 'ms' else 'tflops'}-{dtype}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def plot_train(rows: Sequence[dict], out_dir: Path, stem: str) -> Path | None:
    plt = _pyplot()
    ok = [r for r in rows if harness.as_float(r.get("tokens_per_s")) is not None]
    if plt is None or not ok:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [r["impl"] for r in ok]
    values = [float(r["tokens_per_s"]) for r in ok]
    bars = ax.barh(labels, values, color="tab:blue")
    images = [harness.as_float(r.get("images_per_s")) for r in ok]
    texts = [f"{v:,.0f}" + (f" ({i:,.2f} images/s)" if i else "") for v, i in zip(values, images, strict=True)]
    ax.bar_label(bars, labels=texts, fontsize=8, padding=3)
    ax.invert_yaxis()
    ax.set_xlabel("tokens / s")
    first = ok[0]
    ax.set_title(f"adapter training step: {_count(first['n_layers'], 'layer')} of dim {first['dim']}, "
                 f"{first['batch']} x {first['seq_len']} tokens, {first['dtype']}\n{first['device_name']}", fontsize=9)
    ax.set_xlim(0, max(values) * (1.45 if any(images) else 1.2))
    fig.tight_layout()
    path = out_dir / f"{stem}-train-step.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------
# Markdown


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if value < 1000 else f"{value:,.0f}"


def _count(n: object, noun: str) -> str:
    return f"{n} {noun}" + ("" if str(n) == "1" else "s")


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _best(by_label: dict, prefix: str) -> tuple[float | None, str]:
    """Fastest forward+backward among the labels that start with prefix."""
    best: tuple[float | None, str] = (None, "")
    for label, row in by_label.items():
        ms = _ms(row)
        if label.startswith(prefix) and ms is not None and (best[0] is None or ms < best[0]):
            best = (ms, row.get("sdpa_backend", ""))
    return best


def summary_tables(rows: Sequence[dict]) -> str:
    """The summary table of each headline configuration (bf16, D = 128 on a GPU)."""
    configs = headline_configs(rows)
    if not configs:
        return "(no attention timings)"
    return "\n\n".join(summary_table(rows, config) for config in configs)


def summary_table(rows: Sequence[dict], config: tuple) -> str:
    """One line per T of one configuration: forward+backward of every implementation, the
    fused forward and backward, and the ratios that matter."""
    idx = index(rows)
    shapes = sorted({(int(r["T"]), int(r["B"])) for r in measured(rows) if config_key(r) == config})
    labels = {impl_label(r) for r in measured(rows) if config_key(r) == config}
    has_fused = any(lab.startswith("fused") for lab in labels)
    header = ["T", "B"]
    if has_fused:
        header += ["fused fwd", "fused bwd", "fused fwd+bwd", "fused TFLOP/s"]
    header += ["previous fused fwd+bwd", "two-sdpa fwd+bwd (best backend)", "flex fwd+bwd", "eager fwd+bwd",
               "floor fwd+bwd"]
    header += (["fused speedup vs two-sdpa", "fused speedup vs best baseline", "fused / floor"] if has_fused
               else ["two-sdpa speedup vs eager"])
    body = []
    for T, B in shapes:
        both = {lab: idx.get((config, T, lab, "fwd+bwd")) for lab in labels}
        fused_label = "fused" if "fused" in labels else next((lab for lab in sorted(labels) if lab.startswith("fused")),
                                                              None)
        fused = {m: idx.get((config, T, fused_label, m)) for m in MODES} if fused_label else {}
        two, backend = _best(both, "two-sdpa")
        eager, _ = _best(both, "eager")
        flex, _ = _best(both, "flex")
        previous, _ = _best(both, "fused-previous")
        floor, _ = _best(both, "sdpa floor")
        line = [str(T), str(B)]
        if has_fused:
            mark = " (mismatch!)" if (fused.get("fwd+bwd") or {}).get("status") == "mismatch" else ""
            line += [_fmt(_ms(fused.get("fwd"))), _fmt(_ms(fused.get("bwd"))),
                     _fmt(_ms(fused.get("fwd+bwd"))) + mark,
                     _fmt(harness.as_float((fused.get("fwd+bwd") or {}).get("tflops")))]
        line += [_fmt(previous), f"{_fmt(two)} ({backend})" if two is not None else "-", _fmt(flex), _fmt(eager),
                 _fmt(floor)]
        if has_fused:
            fb = _ms(fused.get("fwd+bwd"))
            best = harness.as_float((fused.get("fwd+bwd") or {}).get("speedup_vs_best"))
            line += [f"{two / fb:.2f}x" if two and fb else "-", f"{best:.2f}x" if best else "-",
                     f"{fb / floor:.2f}x" if fb and floor else "-"]
        else:
            line += [f"{eager / two:.2f}x" if eager and two else "-"]
        body.append(line)
    unit = "times in ms (median), causal, P = 10"
    return f"**{config_title(config)}** ({unit})\n\n" + _table(header, body)


def config_tables(rows: Sequence[dict]) -> str:
    """A table per configuration: rows T, a column per implementation, cells fwd / bwd / fwd+bwd ms."""
    idx = index(rows)
    parts = []
    for config in sorted({config_key(r) for r in measured(rows)}, key=lambda k: (k[0] != "bf16", k[0], -k[1], -k[3])):
        labels = sorted({impl_label(r) for r in measured(rows) if config_key(r) == config}, key=_impl_order)
        shapes = sorted({(int(r["T"]), int(r["B"])) for r in measured(rows) if config_key(r) == config})
        body = []
        for T, B in shapes:
            cells = [str(T), str(B)]
            for label in labels:
                cells.append(" / ".join(_fmt(_ms(idx.get((config, T, label, m)))) for m in MODES))
            body.append(cells)
        parts.append(f"#### {config_title(config)}\n\nms, fwd / bwd / fwd+bwd\n\n" + _table(["T", "B", *labels], body))
    return "\n\n".join(parts)


def train_table(rows: Sequence[dict]) -> str:
    if not rows:
        return "(no train-step results)"
    first = rows[0]
    header = ["implementation", "attention", "tokens/s", "images/s", "step ms (p20-p80)", "peak MiB",
              "trainable params", "first loss", "status"]
    body = []
    for r in rows:
        tps = harness.as_float(r.get("tokens_per_s"))
        ips = harness.as_float(r.get("images_per_s"))
        step = harness.as_float(r.get("step_ms"))
        body.append([
            r["impl"], r.get("attention") or "-", f"{tps:,.0f}" if tps else "-", f"{ips:,.2f}" if ips else "-",
            f"{step:.1f} ({float(r['step_ms_p20']):.1f}-{float(r['step_ms_p80']):.1f})" if step else "-",
            _fmt(harness.as_float(r.get("peak_mem_mib")), 5), r.get("trainable_params") or "-",
            _fmt(harness.as_float(r.get("loss0")), 5),
            r["status"] + (f": {r['note']}" if r["status"] != "ok" and r.get("note") else ""),
        ])
    title = (f"{_count(first['n_layers'], 'layer')} of dim {first['dim']} ({first['n_heads']} heads, "
             f"{first['n_kv_heads']} kv heads, vocab {first['vocab_size']}), adapter of {first['adapter_len']} tokens "
             f"in {_count(first['adapter_layers'], 'layer')}, {first['batch']} x {first['seq_len']} tokens a step, "
             f"{first['dtype']}")
    return f"{title}\n\n" + _table(header, body)


def problems(attention: Sequence[dict], train: Sequence[dict]) -> list[str]:
    """One line per measurement that did not run, or ran with a flag."""
    lines = []
    seen = set()
    for r in attention:
        if r["status"] == "ok":
            continue
        what = (f"{impl_label(r)}, {r['dtype']} D={r['D']} Hkv={r['Hkv']} T={r['T']}: {r['status']}"
                + (f" ({r['note']})" if r.get("note") else ""))
        key = (what if r["status"] != "oom" else what + r["mode"])
        if key not in seen:
            seen.add(key)
            lines.append(what + (f" [{r['mode']}]" if r["status"] == "oom" else ""))
    for r in train:
        if r["status"] != "ok":
            lines.append(f"train step {r['impl']}: {r['status']} ({r.get('note', '')})")
    # Rows that ran but carry a note (a fallback a backend forced) are worth a line too.
    for r in attention:
        if r["status"] == "ok" and r.get("note") and r["mode"] == "fwd+bwd":
            line = f"{impl_label(r)}, {r['dtype']} D={r['D']} Hkv={r['Hkv']} T={r['T']}: {r['note']}"
            if line not in seen:
                seen.add(line)
                lines.append(line)
    return lines


def markdown(attention: Sequence[dict], train: Sequence[dict], images: Sequence[Path]) -> str:
    env = (attention or train)[0]
    kernels_timed = any(r["impl"] == "fused" and harness.as_float(r.get("ms")) is not None for r in attention)
    parts = [f"# Benchmarks: {env['device_name']}",
             f"{harness.format_environment(env)}; {env['date']}."]
    if env["device"] != "cuda" or not kernels_timed:
        parts.append("No fused-kernel timings here: kernel timings need a GPU. The CPU part compares the "
                     "PyTorch implementations (two SDPA calls against the materialized eager reference) and "
                     "the training step of a small model.")
    if attention:
        parts += ["## Attention: summary", summary_tables(attention)]
    if train:
        parts += ["## Adapter training step", train_table(train)]
    if images:
        parts += ["## Plots", "\n\n".join(f"![{p.stem}]({p.name})" for p in images)]
    if attention:
        parts += ["## Attention: every configuration", config_tables(attention)]
    notes = problems(attention, train)
    if notes:
        parts += ["## Not measured, or flagged", "\n".join(f"- {n}" for n in notes)]
    parts.append("FLOPs are counted as FlashAttention counts them (forward 4·B·H·T·S·D, halved when causal, "
                 "plus the prefix term 4·B·H·T·P·D; backward 2.5x the forward). Peak memory is what one "
                 "forward+backward allocates above its inputs. Times are medians; the CSV holds the 20th "
                 "and 80th percentiles.")
    return "\n\n".join(parts) + "\n"


def render(csv_paths: Sequence[Path], out_dir: Path | None = None, stem: str | None = None) -> dict[str, list[Path]]:
    """Write the PNGs and the markdown summary for these CSVs; returns what was written."""
    csv_paths = [Path(p) for p in csv_paths if Path(p).is_file()]
    if not csv_paths:
        raise FileNotFoundError("no CSV files to plot")
    out_dir = Path(out_dir or csv_paths[0].parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or csv_paths[0].name.removesuffix(".csv").removesuffix("-attention").removesuffix("-train-step")
    attention, train = load(csv_paths)
    images = plot_attention(attention, out_dir, stem)
    train_image = plot_train(train, out_dir, stem)
    if train_image:
        images.append(train_image)
    if _pyplot() is None:
        print("matplotlib is not installed: no PNG plots, only the markdown summary")
    summary = out_dir / f"{stem}-summary.md"
    summary.write_text(markdown(attention, train, images), encoding="utf-8")
    return {"png": images, "md": [summary]}


# ----------------------------------------------------------------------------------------
# README section


def latest_gpu_summary(results_dir: Path = harness.RESULTS_DIR) -> Path | None:
    """The newest summary written on a GPU (file names end in the date; CPU ones start with cpu-)."""
    found = [p for p in results_dir.rglob("*-summary.md") if not p.name.startswith("cpu-")]
    return max(found, key=lambda p: (p.name.removesuffix("-summary.md")[-10:], p.stat().st_mtime), default=None)


def readme_section(results_dir: Path = harness.RESULTS_DIR, repo_root: Path = harness.REPO_ROOT) -> str:
    """Markdown for the README: the latest GPU summary table and plot, naming the card."""
    summary = latest_gpu_summary(results_dir)
    if summary is None:
        return ("## Benchmarks\n\nNo GPU results are recorded yet: run `python benchmarks/gpu_first_contact.py OUT` "
                "on a GPU and copy OUT under benchmarks/results/.\n")
    stem = summary.name.removesuffix("-summary.md")
    attention, train = load(sorted(summary.parent.glob(f"{stem}-*.csv")))
    env = (attention or train)[0]
    rel = summary.parent.relative_to(repo_root).as_posix()
    parts = ["## Benchmarks",
             f"Measured on **{env['device_name']}** ({harness.format_environment(env)}), {env['date']}; "
             f"every table and plot: [{rel}/{summary.name}]({rel}/{summary.name}).",
             summary_tables(attention) if attention else ""]
    plot = summary.parent / f"{stem}-attention-time-bf16.png"
    if plot.is_file():
        parts.append(f"![attention time, bf16]({rel}/{plot.name})")
    if train:
        parts.append(train_table(train))
    return "\n\n".join(p for p in parts if p) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, list[Path]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="*", type=Path, help="attention and train-step CSV files of one run")
    p.add_argument("--out", type=Path, help="output folder (default: the first CSV's folder)")
    p.add_argument("--stem", help="output file name stem (default: from the first CSV's name)")
    p.add_argument("--readme", action="store_true", help="print the README section for the newest GPU results")
    args = p.parse_args(argv)
    if args.readme:
        print(readme_section())
        return {}
    written = render(args.csv, args.out, args.stem)
    for path in written["png"] + written["md"]:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
