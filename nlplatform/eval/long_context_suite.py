"""``nlplatform eval CHECKPOINT --suite long_context``: needle-in-a-haystack, passkey and loss by position.

The probes (``probes.py``) are built from the test split of the checkpoint's own corpus, the split training held out,
at lengths from the trained sequence length to 16 times it and at five needle depths. Results go where the commonsense
suite's go: ``eval-long_context-<checkpoint>.json`` beside the checkpoint, ``eval/long_context/...`` metrics and the
plots in the checkpoint's MLflow run, PNGs beside the checkpoint:

- ``...-heatmap.png``: accuracy by context length and needle depth (exact match and top-1 rank), all tasks pooled;
- ``...-length.png``: accuracy against length per task, with the trained length marked;
- ``...-position.png``: loss by token position on long held-out windows (how much each family gains from context).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nlplatform.data import atomic_write_text
from nlplatform.errors import UserError
from nlplatform.eval.long_context import (
    accuracy_grid,
    loss_by_position,
    position_bins,
    score_probe,
    scores_as_dicts,
    summarize,
)
from nlplatform.eval.probes import TASKS, ProbeBuilder, ProbeSettings

SUITE = "long_context"
# The default grid: one task per needle kind, each variant on numbers, and the classic passkey.
DEFAULT_TASKS = ("niah_single_passkey", "niah_single_number", "niah_single_uuid", "niah_multikey_number",
                 "niah_multivalue_number", "niah_multiquery_number", "passkey")  # fmt: skip
LENGTH_MULTIPLES = (1, 2, 4, 8, 16)  # of the trained sequence length
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PER_CELL = 3  # probes per (task, length, depth) unless --limit says otherwise
POSITION_WINDOWS = 8  # held-out windows of the longest length for the loss-by-position curve


@dataclass
class LongContextResult:
    path: Path
    metrics: dict[str, float]
    plots: list[Path]
    mlflow_run_id: str | None


def heldout_tokens(loaded) -> list[int]:
    """The checkpoint corpus's test split (documents joined by blank lines), in the checkpoint's tokens."""
    from nlplatform.data import cache_root
    from nlplatform.data.corpus import split_stream

    return loaded.tokenizer.encode("\n\n".join(split_stream(loaded.recipe.data, "test", cache_root())))


def _check(tasks, lengths, depths, per_cell) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown long-context task(s) {', '.join(unknown)}; available: {', '.join(TASKS)}")
    if per_cell < 1:
        raise UserError(f"--limit (probes per task, length and depth) must be > 0, got {per_cell}")
    if any(n < 1 for n in lengths):
        raise UserError(f"context lengths must be positive, got {list(lengths)}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise UserError(f"needle depths must be in [0, 1], got {list(depths)}")


def evaluate_long_context(
    checkpoint: str | Path,
    *,
    tasks: list[str] | None = None,
    lengths: list[int] | None = None,
    depths: list[float] | None = None,
    limit: int | None = None,
    seed: int = 0,
    device: str | None = None,
    track: bool = True,
) -> LongContextResult:
    """Score ``checkpoint`` on the long-context probes and the loss by position; write and log the results."""
    from tqdm.auto import tqdm

    from nlplatform.checkpoint import load_checkpoint
    from nlplatform.eval.run import default_device, log_eval_to_mlflow

    tasks = list(tasks or DEFAULT_TASKS)
    depths = list(depths if depths is not None else DEPTHS)
    per_cell = limit if limit is not None else PER_CELL
    checkpoint = Path(checkpoint)
    loaded = load_checkpoint(checkpoint, device=device or default_device())
    trained = loaded.recipe.data.seq_len
    lengths = sorted(lengths or [trained * m for m in LENGTH_MULTIPLES])
    _check(tasks, lengths, depths, per_cell)
    filler = heldout_tokens(loaded)
    if len(filler) < max(lengths) + 1:
        raise UserError(
            f"the held-out split has {len(filler):,} tokens, fewer than the longest context ({max(lengths):,}): "
            "use shorter lengths (--lengths) or a corpus with a larger test split"
        )
    builder = ProbeBuilder(loaded.tokenizer.encode, filler, ProbeSettings())
    t0 = time.time()
    scores, skipped = [], []
    cells = [(task, n, d) for task in tasks for n in lengths for d in depths]
    for task, n, d in tqdm(cells, desc="long-context probes", unit="cell"):
        for index in range(per_cell):
            try:
                probe = builder.build(task, n, d, seed, index)
            except ValueError as exc:  # this length cannot hold the task's needles and question
                skipped.append({"task": task, "length": n, "reason": str(exc)})
                break
            scores.append(score_probe(loaded.model, probe, loaded.tokenizer.decode))
    if not scores:
        raise UserError(f"no probe fits the lengths {lengths}: {skipped[0]['reason']}")

    longest = max(lengths)
    starts = torch.linspace(0, len(filler) - longest - 1, POSITION_WINDOWS).long().tolist()
    windows = torch.tensor([filler[s : s + longest + 1] for s in starts])
    losses, blown = loss_by_position(loaded.model, windows, batch_size=1)
    if blown:
        print(f"warning: {blown} of {len(starts)} held-out windows of {longest:,} tokens gave non-finite losses (the "
              "model's state blew up); the loss by position leaves them out", file=sys.stderr)  # fmt: skip
    metrics = summarize(scores, trained)
    metrics["eval/long_context/nonfinite_windows"] = float(blown)
    metrics["eval/long_context/loss_within"] = float(losses[:trained].mean())
    if longest > trained:
        metrics["eval/long_context/loss_beyond"] = float(losses[trained:].mean())

    stem = f"eval-{SUITE}-{checkpoint.stem}"
    title = f"{loaded.recipe.model.name} ({loaded.recipe.model.preset}), step {loaded.step}"
    plots = [
        plot_heatmaps(scores, checkpoint.parent / f"{stem}-heatmap.png", title, trained),
        plot_by_length(scores, checkpoint.parent / f"{stem}-length.png", title, trained),
        plot_by_position(losses, checkpoint.parent / f"{stem}-position.png", title, trained),
    ]
    path = checkpoint.parent / f"{stem}.json"
    report = {
        "checkpoint": str(checkpoint.resolve()),
        "step": loaded.step,
        "model": loaded.recipe.model.name,
        "preset": loaded.recipe.model.preset,
        "suite": SUITE,
        "trained_length": trained,
        "tasks": tasks,
        "lengths": lengths,
        "depths": depths,
        "per_cell": per_cell,
        "seed": seed,
        "wall_s": time.time() - t0,
        "metrics": metrics,
        "position_bins": position_bins(losses),
        "skipped": skipped,
        "scores": scores_as_dicts(scores),
    }
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    run_id = log_eval_to_mlflow(checkpoint, metrics, loaded.step, [path, *plots]) if track else None
    return LongContextResult(path=path, metrics=metrics, plots=plots, mlflow_run_id=run_id)


def format_summary(metrics: dict[str, float]) -> str:
    """Exact match and top-1 within and beyond the trained length, as a small markdown table; the share of probes with
    non-finite log-likelihoods (scored as wrong) when there are any."""
    lines = ["| | within trained length | beyond |", "|---|---|---|"]
    for metric in ("exact", "top1", "nonfinite"):
        cells = [metrics.get(f"eval/long_context/all/{metric}_{where}") for where in ("within", "beyond")]
        if metric != "nonfinite" or any(cells):
            lines.append(f"| {metric} | " + " | ".join("-" if c is None else f"{100 * c:.1f}%" for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- plots


def plot_heatmaps(scores, path: Path, title: str, trained: int) -> Path:
    from nlplatform.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for ax, metric, label in zip(axes, ("exact", "top1"), ("exact match", "top-1 by log-likelihood")):
        lengths, depths, grid = accuracy_grid(scores, metric)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{n:,}{'*' if n <= trained else ''}" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("context length (tokens; * within the trained length)")
        ax.set_ylabel("needle depth")
        ax.set_title(label, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"long-context probes, all tasks: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_by_position(losses: torch.Tensor, path: Path, title: str, trained: int) -> Path:
    from nlplatform.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    positions = torch.arange(1, losses.numel() + 1)
    ax.plot(positions, losses, color="tab:blue", alpha=0.25, linewidth=0.6, label="per position")
    bins = position_bins(losses, bins=24)
    ax.plot([(b["start"] + b["end"]) / 2 for b in bins], [b["loss"] for b in bins], "o-", color="tab:blue",
            markersize=3, label="log-spaced bins")  # fmt: skip
    ax.axvline(trained, color="black", linestyle="--", linewidth=1, label="trained length")
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"loss by position on held-out text: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
