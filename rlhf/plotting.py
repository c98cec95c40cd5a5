"""Training curves from metrics.jsonl as PNG files a person can look at."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from rlhf.logging import read_metrics

# Panels drawn first when a run logged them; the rest of the numeric metrics follow.
PREFERRED = ("loss", "eval/loss", "eval/accuracy", "eval/format_rate", "reward/mean", "kl", "entropy",
             "response/length_mean", "eval/pairwise_accuracy", "lr", "grad_norm")
SKIP = ("step", "time/step_s", "samples_seen")


def plot_run(run_dir: Path, keys: Sequence[str] | None = None, max_panels: int = 9,
             filename: str = "curves.png") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.suptitle(Path(run_dir).name, fontsize=11)
    fig.tight_layout()
    out = Path(run_dir) / filename
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
