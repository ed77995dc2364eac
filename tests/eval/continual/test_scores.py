"""Continual-learning scores on hand-made result matrices, worked out by hand."""

from __future__ import annotations

import pytest

from nlplatform.eval.continual.scores import continual_scores

ACC = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.2], [0.5, 0.7, 0.9]]  # R[stage][domain]
PPL = [[10.0, 50.0, 80.0], [14.0, 12.0, 60.0], [20.0, 15.0, 11.0]]


def test_accuracy_matrix_gives_the_known_forgetting_and_transfer():
    """Average (0.5 + 0.7 + 0.9) / 3; forgetting ((0.9 - 0.5) + (0.8 - 0.7)) / 2; backward transfer
    ((0.5 - 0.9) + (0.7 - 0.8)) / 2; forward transfer ((0.1 - 0.05) + (0.2 - 0.0)) / 2."""
    scores = continual_scores(ACC, baseline=[0.1, 0.05, 0.0])
    assert scores == pytest.approx(
        {"average": 0.7, "forgetting": 0.25, "backward_transfer": -0.25, "forward_transfer": 0.125}
    )


def test_perplexity_matrix_counts_a_rise_as_forgetting():
    """Lower is better: forgetting ((20 - 10) + (15 - 12)) / 2 = 6.5 and backward transfer -6.5."""
    scores = continual_scores(PPL, higher_is_better=False)
    assert scores == pytest.approx({"average": 46 / 3, "forgetting": 6.5, "backward_transfer": -6.5})


def test_no_forgetting_when_nothing_is_lost():
    keep = [[0.8, 0.0], [0.8, 0.9]]
    assert continual_scores(keep) == pytest.approx({"average": 0.85, "forgetting": 0.0, "backward_transfer": 0.0})


@pytest.mark.parametrize("matrix", [[[1.0]], [[1.0, 2.0], [3.0]], [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])
def test_non_square_matrices_are_refused(matrix):
    with pytest.raises(ValueError, match="must be square with at least 2 stages"):
        continual_scores(matrix)


def test_blank_cells_of_tasks_not_learned_yet_are_not_a_previous_best():
    """Class-incremental matrices leave R[i][j] blank (NaN) for j > i: forgetting of task 0 is 0.9 - 0.3 (its best
    after it was learned), of task 1 0.8 - 0.6."""
    nan = float("nan")
    scores = continual_scores([[0.9, nan, nan], [0.5, 0.8, nan], [0.3, 0.6, 0.7]])
    assert scores == pytest.approx({"average": 1.6 / 3, "forgetting": 0.4, "backward_transfer": -0.4})
