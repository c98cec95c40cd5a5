"""Print the headline results of run directories side by side: python scripts/summarize.py RUN_DIR..."""

import json
import sys
from pathlib import Path

KEYS = ("accuracy", "format_rate", "pairwise_accuracy", "kl", "wall_s")


def main(run_dirs: list[str]) -> None:
    print(f"{'run':28s}" + "".join(f"{k:>20s}" for k in KEYS))
    for run_dir in run_dirs:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        initial = summary.get("initial", {})
        cells = []
        for key in KEYS:
            value = summary.get(key)
            start = initial.get(key)
            text = "-" if value is None else f"{value:.3f}" if start is None else f"{start:.3f} -> {value:.3f}"
            cells.append(f"{text:>20s}")
        print(f"{run_dir:28s}" + "".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
