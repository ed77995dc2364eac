"""The continual suite's figures: its stage-by-column matrices as heatmaps, one panel per reading mode or class
setting, written beside the checkpoint."""

from __future__ import annotations

from pathlib import Path

from nlplatform.eval.report import heatmap, save_figure


def plot_matrices(matrices: dict[str, list[list[float]]], rows, columns, path: Path, title: str, what: str) -> Path:
    """One heatmap per matrix (reading mode or class setting): ``what`` is ``perplexity`` (log colour scale, lower is
    better) or ``accuracy`` (0 to 1, higher is better; NaN cells, tasks not learned yet, left blank)."""
    from matplotlib.colors import LogNorm, Normalize

    from nlplatform.plots import pyplot

    plt = pyplot()
    names = list(matrices)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 0.6 * len(rows) + 2.2), dpi=120, squeeze=False)
    ppl = what == "perplexity"
    for ax, name in zip(axes[0], names):
        grid = matrices[name]
        norm = LogNorm() if ppl else Normalize(0.0, 1.0)
        heatmap(fig, ax, grid, "{:.1f}" if ppl else "{:.2f}", cmap="RdYlGn_r" if ppl else "RdYlGn", norm=norm)
        ax.set_xticks(range(len(columns)), columns, rotation=20)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("held-out domain" if ppl else "test task")
        ax.set_title(f"{what}, {name.replace('_', '-')}", fontsize=10)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
