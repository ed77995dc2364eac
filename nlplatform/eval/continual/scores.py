"""Continual-learning scores from a stage-by-domain result matrix (the forgetting measures behind Nested Learning arXiv
Fig. 6 and 8).

``R[i][j]`` is the score on domain ``j`` after training stage ``i`` (stage ``i`` trains on domain ``i``), for
``T`` stages and domains. With ``higher_is_better`` (accuracy) the usual definitions apply; for losses or
perplexities (lower is better) the differences are negated, so that forgetting is positive when a domain got worse
in every case:

- **average score**: the mean of the last row, ``(1/T) sum_j R[T-1][j]``;
- **average forgetting** (Chaudhry et al., 2018): for each earlier domain ``j < T-1``, the best score it ever had
  before the last stage minus its final score, ``max_{l < T-1} R[l][j] - R[T-1][j]``, averaged over ``j``;
- **backward transfer** (Lopez-Paz and Ranzato, 2017): ``(1/(T-1)) sum_{j < T-1} (R[T-1][j] - R[j][j])``, how
  later stages changed the score a domain had right after it was learned (negative = forgetting);
- **forward transfer** needs the scores before each domain is trained, ``R[i-1][i]``, against a reference ``b_i``
  (the score of the starting model): ``(1/(T-1)) sum_{i >= 1} (R[i-1][i] - b_i)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check(matrix: Sequence[Sequence[float]]) -> int:
    T = len(matrix)
    if T < 2 or any(len(row) != T for row in matrix):
        raise ValueError(f"the result matrix must be square with at least 2 stages, got {[len(r) for r in matrix]}")
    return T


def continual_scores(
    matrix: Sequence[Sequence[float]],
    higher_is_better: bool = True,
    baseline: Sequence[float] | None = None,
) -> dict[str, float]:
    """Average score, average forgetting, backward transfer (and forward transfer with ``baseline``, the starting
    model's score on each domain) of the matrix ``R[stage][domain]``."""
    T = _check(matrix)
    sign = 1.0 if higher_is_better else -1.0
    last = matrix[T - 1]
    # NaN entries (a class-incremental task not learned yet) do not count as a previous best
    forgetting = [
        sign * (max(sign * matrix[i][j] for i in range(T - 1) if not math.isnan(matrix[i][j])) * sign - last[j])
        for j in range(T - 1)
    ]
    scores = {
        "average": sum(last) / T,
        "forgetting": sum(forgetting) / (T - 1),
        "backward_transfer": sum(sign * (last[j] - matrix[j][j]) for j in range(T - 1)) / (T - 1),
    }
    if baseline is not None:
        if len(baseline) != T:
            raise ValueError(f"baseline must give one score per domain ({T}), got {len(baseline)}")
        scores["forward_transfer"] = sum(sign * (matrix[i - 1][i] - baseline[i]) for i in range(1, T)) / (T - 1)
    return scores
