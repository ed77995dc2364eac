"""The class-incremental protocol on oracle models: perfect memory scores 1 and forgets nothing, a model that only
remembers its latest task forgets everything; the training stream marks exactly the labels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nlplatform.data.tokenizer import Tokenizer
from nlplatform.eval.continual.class_incremental import accuracy, label_scores, run_class_incremental, training_stream
from nlplatform.eval.continual.intents import TASKS, Example, intent_examples

TOK = Tokenizer()  # bytes
EOT = TOK.eot_id


class LabelOracle(nn.Module):
    """A 'language model' that, after ``<eot><utterance>\\nintent:``, puts all its mass on the next token of the
    label it believes: the true label for utterances of a task in ``known``, else the first label of ``fallback`` (a
    model biased to its latest classes); uniform anywhere else. ``learn`` is its fine-tuning: it comes to know the
    tasks whose labels are marked in a training stream, and forgets the rest unless ``remembers``."""

    def __init__(self, examples: list[Example], remembers: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))  # the reader takes device and dtype from the parameters
        self.examples, self.remembers = examples, remembers
        self.known: set[str] = set()
        self.fallback: str | None = None

    def learn(self, tokens: torch.Tensor, targets: torch.Tensor, seed: int) -> float:
        marked = TOK.decode(tokens[targets].tolist())
        tasks = {t for t, intents in TASKS.items() if any(f" {label}" in marked for label in intents)}
        assert len(tasks) == 1, marked[:200]  # a stage's stream holds exactly one task's labels
        self.known = (self.known if self.remembers else set()) | tasks
        self.fallback = next(iter(tasks))
        return 0.0

    def _answer(self, prefix: list[int]) -> int | None:
        for e in self.examples:
            prompt = [EOT, *TOK.encode(e.prompt)]
            if prefix[: len(prompt)] == prompt:
                label = e.label if e.task in self.known else next(iter(TASKS[self.fallback]))
                answer = TOK.encode(f" {label}") + [EOT]
                k = len(prefix) - len(prompt)
                return answer[k] if k < len(answer) and prefix[len(prompt) :] == answer[:k] else None
        return None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, TOK.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row)):
                nxt = self._answer(row[: t + 1])
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits + 0 * self.weight


TASK_ORDER = ("banking", "travel", "home")


def _run(remembers: bool):
    examples = [e for t in TASK_ORDER for e in intent_examples(t, 4, 3, seed=0)[1]]
    oracle = LabelOracle(examples, remembers)
    return run_class_incremental(
        oracle,
        TOK,
        TASK_ORDER,
        lambda model, *stage: model.learn(*stage),
        train_per_label=4,
        test_per_label=3,
        seq_len=64,
        seed=0,
    )


def test_a_model_that_remembers_every_label_scores_one_and_forgets_nothing():
    report = _run(remembers=True)
    for setting in ("class_il", "task_il"):
        matrix = report["accuracy"][setting]
        assert all(matrix[i][j] == 1.0 for i in range(3) for j in range(i + 1))
        assert all(math.isnan(matrix[i][j]) for i in range(3) for j in range(i + 1, 3))  # not learned yet: blank
        assert report["scores"][setting] == pytest.approx({"average": 1.0, "forgetting": 0.0, "backward_transfer": 0.0})
    assert report["chance_class_il"] == pytest.approx([1 / 3, 1 / 6, 1 / 9])


def test_a_model_that_only_knows_its_latest_task_forgets_every_earlier_one():
    """Class-IL: earlier tasks' requests get the latest task's label, so accuracy 1 right after a task is learned
    and 0 after the next one: average 1/3, forgetting 1, backward transfer -1."""
    report = _run(remembers=False)
    expected = [[1.0, math.nan, math.nan], [0.0, 1.0, math.nan], [0.0, 0.0, 1.0]]
    assert all(
        x == y or math.isnan(x) and math.isnan(y)
        for r, e in zip(report["accuracy"]["class_il"], expected)
        for x, y in zip(r, e)
    )
    assert report["scores"]["class_il"] == pytest.approx(
        {"average": 1 / 3, "forgetting": 1.0, "backward_transfer": -1.0}
    )


def test_training_stream_marks_the_labels_and_end_of_text_and_nothing_else():
    train, _ = intent_examples("travel", 5, 2, seed=1)
    tokens, targets = training_stream(train, TOK.encode, EOT, min_tokens=2000, seed=0)
    assert tokens.numel() >= 2000 and tokens.shape == targets.shape and tokens[0] == EOT and not targets[0]
    text = TOK.decode(tokens.tolist())
    assert text.count("\nintent: ") == int((tokens == EOT).sum()) - 1  # one example between two end-of-texts
    marked = TOK.decode(tokens[targets].tolist()).split("<|endoftext|>")[:-1]
    assert set(marked) == {f" {label}" for label in TASKS["travel"]}


def test_accuracy_picks_the_most_likely_label_among_those_allowed_and_counts_ties_wrong():
    examples = [Example("home", "lights", "u1"), Example("home", "music", "u2"), Example("home", "lights", "u3")]
    scores = [
        {"lights": -1.0, "music": -2.0, "hotel": -0.5},
        {"lights": -1.0, "music": -1.0, "hotel": -3.0},
        {"lights": -0.1, "music": -5.0, "hotel": -9.0},
    ]
    assert accuracy(scores, examples, ["lights", "music"]) == pytest.approx(2 / 3)  # the tie in u2 is wrong
    assert accuracy(scores, examples, ["lights", "music", "hotel"]) == pytest.approx(1 / 3)


def test_label_scores_of_a_random_model_are_near_chance():
    """An untrained model has no idea: class-IL accuracy over the 9 labels of three tasks stays near 1/9."""
    from nlplatform.recipe import load_recipe
    from nlplatform.registry import build_model
    from tests.eval.conftest import ROOT

    recipe = load_recipe(
        ROOT / "recipes" / "deltanet" / "tiny.yaml", ["model.vocab_size=257", "model.d_model=32", "model.n_layers=1"]
    )
    model = build_model(recipe.model)
    test = [e for t in TASK_ORDER for e in intent_examples(t, 1, 8, seed=0)[1]]
    labels = [label for t in TASK_ORDER for label in TASKS[t]]
    scores = label_scores(model, test, {label: TOK.encode(f" {label}") + [EOT] for label in labels}, TOK.encode, EOT)
    assert all(set(s) == set(labels) and all(math.isfinite(v) and v < 0 for v in s.values()) for s in scores)
    assert accuracy(scores, test, labels) <= 0.3
