"""PNG plots for the reproduction report; every function returns None when matplotlib is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def have_matplotlib() -> bool:
    return _pyplot() is not None


def fid_curves(curves: dict[str, tuple[list[int], list[list[float]]]], path: Path, ylabel: str,
               title: str = "") -> Path | None:
    """One line per method: the mean over seeds against AR steps, with the min-max band over seeds.

    ``curves[method] = (steps, per_seed)`` where ``per_seed[i]`` holds one value per step.
    """
    plt = _pyplot()
    if plt is None:
        return None
    # left: the whole run on a log scale; right: its second half, where the methods separate (or do not)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    last = max((steps[-1] for steps, _ in curves.values() if steps), default=0)
    for ax, start in zip(axes, (0, last / 2)):
        for method, (steps, per_seed) in curves.items():
            keep = [i for i, s in enumerate(steps) if s >= start]
            values = np.asarray(per_seed, dtype=float)[:, keep]  # (seeds, steps)
            x = [steps[i] for i in keep]
            seeds = "1 seed" if len(values) == 1 else f"{len(values)} seeds"
            line, = ax.plot(x, values.mean(axis=0), marker="o", markersize=3, label=f"{method} ({seeds})")
            if len(values) > 1:
                ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
        ax.set_xlabel("AR training steps")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_title(title)
    axes[1].set_title(f"from step {last / 2:g}")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_metrics(run_dir: Path, keys: tuple[str, ...]) -> dict[str, tuple[list[int], list[float]]]:
    """``key -> (steps, values)`` from a run's metrics.jsonl, for the lines that hold the key."""
    out: dict[str, tuple[list[int], list[float]]] = {k: ([], []) for k in keys}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for k in keys:
            if k in row:
                out[k][0].append(int(row["step"]))
                out[k][1].append(float(row[k]))
    return out


def codebook_over_training(runs: dict[str, tuple[Path, int]], path: Path,
                           xlabel: str = "tokenizer training steps (warm-up, then joint)") -> Path | None:
    """Codebook usage and perplexity (training batches, per log window) of tokenizer-training runs.

    ``runs[label] = (run_dir, offset)``: the run's steps are drawn shifted by ``offset`` (a joint run
    continues the warm-up, so it starts where the warm-up ended).
    """
    plt = _pyplot()
    if plt is None:
        return None
    keys = ("codebook/usage_window", "codebook/perplexity")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, (run_dir, offset) in runs.items():
        series = read_metrics(run_dir, keys)
        for ax, key in zip(axes, keys):
            steps, values = series[key]
            ax.plot([s + offset for s in steps], values, marker=".", label=label)  # a marker: short runs log one point
    for ax, key in zip(axes, ("codebook usage (per log window)", "codebook perplexity (per log window)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
