"""The long-context suite's figures, written beside the checkpoint:

- ``...-heatmap.png``: accuracy by context length and needle depth (exact match and top-1 rank), all tasks pooled;
- ``...-length.png``: accuracy against length per task, with the trained length marked;
- ``...-position.png``: loss by token position on long held-out windows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nlplatform.eval.long_context.scoring import accuracy_grid, position_bins
from nlplatform.eval.report import heatmap, save_figure


def plot_heatmaps(scores, path: Path, title: str, trained: int) -> Path:
    from nlplatform.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for ax, metric, label in zip(axes, ("exact", "top1"), ("exact match", "top-1 by log-likelihood")):
        lengths, depths, grid = accuracy_grid(scores, metric)
        percent = [[100 * value for value in row] for row in grid]
        heatmap(fig, ax, percent, "{:.0f}", cmap="RdYlGn", vmin=0, vmax=100, origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{n:,}{'*' if n <= trained else ''}" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens; * within the trained length)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{label} (%)", fontsize=10)
    fig.suptitle(f"long-context probes, all tasks: {title}", fontsize=10)
    return save_figure(fig, path)


def plot_by_length(scores, path: Path, title: str, trained: int) -> Path:
    from nlplatform.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120, sharey=True)
    tasks = sorted({s.task for s in scores})
    for ax, metric, label in zip(axes, ("exact", "top1"), ("exact match", "top-1 by log-likelihood")):
        for task in [*tasks, None]:  # None: every task pooled, the thick line (per task, a few probes per point)
            by_length: dict[int, list[float]] = {}
            for s in scores:
                if task is None or s.task == task:
                    hit = s.exact if metric == "exact" else s.rank == 1
                    by_length.setdefault(s.length, []).append(float(hit))
            xs = sorted(by_length)
            ys = [sum(by_length[x]) / len(by_length[x]) for x in xs]
            if task is None:
                ax.plot(xs, ys, "o-", color="black", linewidth=2.5, markersize=5, label="all tasks")
            else:
                ax.plot(xs, ys, "o-", label=task, markersize=3, linewidth=1, alpha=0.6)
        if metric == "top1":
            chance = 1 / scores[0].candidates
            ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label=f"chance ({chance:.0%})")
        ax.axvline(trained, color="black", linestyle="--", linewidth=1, label="trained length")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"accuracy by context length: {title}", fontsize=10)
    return save_figure(fig, path)


def plot_by_position(losses: torch.Tensor, path: Path, title: str, trained: int) -> Path:
    from nlplatform.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    positions = torch.arange(1, losses.numel() + 1)
    ax.plot(positions, losses, color="tab:blue", alpha=0.25, linewidth=0.6, label="per position")
    bins = position_bins(losses, bins=24)
    ax.plot(
        [(b["start"] + b["end"]) / 2 for b in bins],
        [b["loss"] for b in bins],
        "o-",
        color="tab:blue",
        markersize=3,
        label="log-spaced bins",
    )
    ax.axvline(trained, color="black", linestyle="--", linewidth=1, label="trained length")
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"loss by position on held-out text: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
