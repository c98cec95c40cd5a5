"""Training curves from metrics.jsonl as PNG files a person can look at."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from rlhf.tracking import read_metrics

# Panels drawn first when a run logged them; the rest of the numeric metrics follow.
PREFERRED = ("loss", "eval/loss", "eval/accuracy", "eval/format_rate", "reward/mean", "kl", "entropy",
             "response/length_mean", "eval/pairwise_accuracy", "lr", "grad_norm")
SKIP = ("step", "time/step_s", "samples_seen")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path, keys: Sequence[str] | None = None, max_panels: int = 9,
             filename: str = "curves.png", out: Path | None = None, title: str | None = None) -> Path | None:
    """Draw a run's metrics against step, one panel per key (default: the PREFERRED ones it logged, then the rest);
    written to run_dir/filename, or to `out`."""
    plt = _pyplot()
    records = read_metrics(run_dir)
    numeric = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k not in SKIP}
    if keys is None:
        keys = [k for k in PREFERRED if k in numeric] + sorted(numeric - set(PREFERRED))
    keys = [k for k in keys if k in numeric][:max_panels]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title or Path(run_dir).name, fontsize=11)
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / filename
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_against_time(runs: dict[str, Path], key: str, out: Path, title: str) -> Path | None:
    """One metric of several runs on one axis against wall-clock seconds of training (cumulative time/step_s),
    so runs given the same time budget can be compared."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = 0
    for label, run_dir in runs.items():
        elapsed, points = 0.0, []
        for record in read_metrics(run_dir):
            if "loss" in record:  # a training step (evaluation records carry their own time)
                elapsed += float(record.get("time/step_s") or 0.0)
            if isinstance(record.get(key), (int, float)):
                points.append((elapsed, record[key]))
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training seconds", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
