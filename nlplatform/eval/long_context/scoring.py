"""Scoring long-context probes and loss by position, for any family of the platform (Nested Learning arXiv §9.2,
Table 1 and Fig. 10).

Each probe's prompt is read once (``nlplatform/eval/reader.py``); each candidate answer and the greedy answer then
continue from a copy of the model's state after it.

Two scores per probe:

- **exact match**: greedy decoding of as many tokens as the true answer has (plus ``slack``) contains every value;
- **rank** of the true answer's log-likelihood among the probe's candidates (1 = best). Top-1 by rank is 1 / number
  of candidates for a model that ignores the context, so tiny models that cannot yet copy a number show a signal.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from nlplatform.eval.long_context.probes import Probe
from nlplatform.eval.reader import PromptReader


@dataclass(frozen=True)
class ProbeScore:
    task: str
    length: int
    depth: float
    index: int
    exact: bool  # the greedy answer contains every value
    rank: int  # of the true answer among the candidates by log-likelihood (1 = most likely)
    candidates: int
    generated: str
    finite: bool = True  # every candidate's log-likelihood is a number (False: the model's state blew up)


def score_probe(model: nn.Module, probe: Probe, decode, slack: int = 2) -> ProbeScore:
    """Exact match and answer rank of ``model`` on ``probe``; ``decode`` turns token ids into text."""
    n_answer = len(probe.candidates[0]) + slack
    room = max(n_answer, max(len(c) for c in probe.candidates))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # not inference mode: Titans and HOPE take inner gradient steps
            reader = PromptReader(model, probe.prompt, room)
            scores = [reader.logprob(c) for c in probe.candidates]
            generated = decode(reader.greedy(n_answer))
    finally:
        model.train(was_training)
    finite = all(math.isfinite(s) for s in scores)
    # A NaN compares False with everything, so it would rank first: a non-finite true answer ranks last, and a
    # non-finite distractor counts as beating it (the model gets no credit from a state that blew up).
    rank = (
        1 + sum(not math.isfinite(s) or s > scores[0] for s in scores[1:]) if math.isfinite(scores[0]) else len(scores)
    )
    exact = all(v in generated for v in probe.values)
    return ProbeScore(probe.task, probe.length, probe.depth, probe.index, exact, rank, len(scores), generated, finite)


def summarize(scores: Sequence[ProbeScore], trained_length: int) -> dict[str, float]:
    """Metrics for MLflow: exact match, top-1 rank accuracy and mean reciprocal rank per task and per length
    (``eval/long_context/<task>/top1_len512``) and within and beyond the trained length (``.../top1_within``,
    ``top1_beyond``); ``all`` pools the tasks. Accuracies in [0, 1]. ``all/nonfinite_<where>``: the share of probes
    with a non-finite log-likelihood (scored as wrong)."""
    groups: dict[tuple[str, ...], list[ProbeScore]] = defaultdict(list)
    for s in scores:
        where = "within" if s.length <= trained_length else "beyond"
        for key in ((s.task, str(s.length)), ("all", str(s.length)), (s.task, where), ("all", where)):
            groups[key].append(s)
    out = {}
    for (task, where), group in sorted(groups.items()):
        where = where if where in ("within", "beyond") else f"len{where}"
        out[f"eval/long_context/{task}/exact_{where}"] = sum(s.exact for s in group) / len(group)
        out[f"eval/long_context/{task}/top1_{where}"] = sum(s.rank == 1 for s in group) / len(group)
        out[f"eval/long_context/{task}/mrr_{where}"] = sum(1 / s.rank for s in group) / len(group)
        if task == "all" and where in ("within", "beyond"):
            out[f"eval/long_context/all/nonfinite_{where}"] = sum(not s.finite for s in group) / len(group)
    return out


def accuracy_grid(scores: Sequence[ProbeScore], metric: str = "exact") -> tuple[list[int], list[float], list[list]]:
    """(lengths, depths, grid[depth][length]) of mean accuracy over all tasks: the heatmap's data."""
    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for s in scores:
        cells[s.length, s.depth].append(float(s.exact) if metric == "exact" else float(s.rank == 1))
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    grid = [[_mean(cells.get((n, d))) for n in lengths] for d in depths]
    return lengths, depths, grid


def _mean(values: list[float] | None) -> float:
    return sum(values) / len(values) if values else math.nan


def loss_by_position(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> tuple[torch.Tensor, int]:
    """Mean next-token loss at every position of ``windows`` [N, T + 1] (token t predicted from tokens < t): how well
    a model uses its context as it grows (the paper's context-usage figure, arXiv Fig. 10). Returns ([T], the number of
    windows left out because some of their losses are not finite: a memory that blew up on a long window would otherwise
    turn the whole curve NaN)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    kept = 0
    try:
        with torch.no_grad():  # not inference mode: Titans and HOPE take inner gradient steps
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(batch[:, :-1]).float()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
                finite = torch.isfinite(nll).all(-1)
                total += nll[finite].sum(0).double().cpu()
                kept += int(finite.sum())
    finally:
        model.train(was_training)
    losses = (total / kept).float() if kept else torch.full_like(total, math.nan, dtype=torch.float32)
    return losses, windows.shape[0] - kept


def position_bins(losses: torch.Tensor, bins: int = 12) -> list[dict[str, float]]:
    """Log-spaced position bins of a loss-by-position curve: ``[{"start", "end", "loss", "ppl"}]``."""
    T = losses.numel()
    edges = sorted({0, *(int(round(math.exp(math.log(T) * i / bins))) for i in range(1, bins + 1))})
    rows = []
    for a, b in zip(edges, edges[1:]):
        if b > a:
            mean = float(losses[a:b].mean())
            rows.append({"start": a, "end": b, "loss": mean, "ppl": math.exp(mean)})
    return rows


def scores_as_dicts(scores: Sequence[ProbeScore]) -> list[dict]:
    return [asdict(s) for s in scores]
