"""``nlplatform eval CHECKPOINT --suite long_context``: needle-in-a-haystack, passkey and loss by position.

The probes (``probes.py``) are built from the test split of the checkpoint's own corpus, the split training held out,
at lengths from the trained sequence length to 16 times it and at five needle depths, and scored by ``scoring.py``.
Results go where every suite's go (``nlplatform/eval/report.py``): ``eval-long_context-<checkpoint>.json`` beside the
checkpoint, ``eval/long_context/...`` metrics and the plots (``plots.py``) in the checkpoint's MLflow run, PNGs
beside the checkpoint:

- ``...-heatmap.png``: accuracy by context length and needle depth (exact match and top-1 rank), all tasks pooled;
- ``...-length.png``: accuracy against length per task, with the trained length marked;
- ``...-position.png``: loss by token position on long held-out windows (how much each family gains from context).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from nlplatform.errors import UserError
from nlplatform.eval.checkpoint import heldout_tokens, load
from nlplatform.eval.long_context.plots import plot_by_length, plot_by_position, plot_heatmaps
from nlplatform.eval.long_context.probes import TASKS, ProbeBuilder, ProbeSettings
from nlplatform.eval.long_context.scoring import (
    loss_by_position,
    position_bins,
    score_probe,
    scores_as_dicts,
    summarize,
)
from nlplatform.eval.report import SuiteResult, plot_title, publish, results_stem

SUITE = "long_context"
# The default grid: one task per needle kind, each variant on numbers, and the classic passkey.
DEFAULT_TASKS = (
    "niah_single_passkey",
    "niah_single_number",
    "niah_single_uuid",
    "niah_multikey_number",
    "niah_multivalue_number",
    "niah_multiquery_number",
    "passkey",
)
LENGTH_MULTIPLES = (1, 2, 4, 8, 16)  # of the trained sequence length
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PER_CELL = 3  # probes per (task, length, depth) unless --limit says otherwise
POSITION_WINDOWS = 8  # held-out windows of the longest length for the loss-by-position curve


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
) -> SuiteResult:
    """Score ``checkpoint`` on the long-context probes and the loss by position; write and log the results."""
    from tqdm.auto import tqdm

    tasks = list(tasks or DEFAULT_TASKS)
    depths = list(depths if depths is not None else DEPTHS)
    per_cell = limit if limit is not None else PER_CELL
    checkpoint = Path(checkpoint)
    loaded = load(checkpoint, device)
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
        print(
            f"warning: {blown} of {len(starts)} held-out windows of {longest:,} tokens gave non-finite losses (the "
            "model's state blew up); the loss by position leaves them out",
            file=sys.stderr,
        )
    metrics = summarize(scores, trained)
    metrics["eval/long_context/nonfinite_windows"] = float(blown)
    metrics["eval/long_context/loss_within"] = float(losses[:trained].mean())
    if longest > trained:
        metrics["eval/long_context/loss_beyond"] = float(losses[trained:].mean())

    stem = results_stem(checkpoint, SUITE)
    title = plot_title(loaded)
    plots = [
        plot_heatmaps(scores, stem.with_name(f"{stem.name}-heatmap.png"), title, trained),
        plot_by_length(scores, stem.with_name(f"{stem.name}-length.png"), title, trained),
        plot_by_position(losses, stem.with_name(f"{stem.name}-position.png"), title, trained),
    ]
    fields = {
        "trained_length": trained,
        "tasks": tasks,
        "lengths": lengths,
        "depths": depths,
        "per_cell": per_cell,
        "seed": seed,
        "wall_s": time.time() - t0,
        "position_bins": position_bins(losses),
        "skipped": skipped,
        "scores": scores_as_dicts(scores),
    }
    return publish(checkpoint, loaded, SUITE, fields, metrics, plots, track=track)


def format_summary(metrics: dict[str, float]) -> str:
    """Exact match and top-1 within and beyond the trained length, as a small markdown table; the share of probes with
    non-finite log-likelihoods (scored as wrong) when there are any."""
    lines = ["| | within trained length | beyond |", "|---|---|---|"]
    for metric in ("exact", "top1", "nonfinite"):
        cells = [metrics.get(f"eval/long_context/all/{metric}_{where}") for where in ("within", "beyond")]
        if metric != "nonfinite" or any(cells):
            lines.append(f"| {metric} | " + " | ".join("-" if c is None else f"{100 * c:.1f}%" for c in cells) + " |")
    return "\n".join(lines)
