"""The synthetic intent set: deterministic, every template fills, training and test utterances never coincide."""

from __future__ import annotations

import re

import pytest

from nlplatform.eval.continual.intents import LABELS, SLOTS, TASKS, intent_examples


def test_every_template_names_only_known_slots_and_labels_are_unique():
    for intents in TASKS.values():
        assert len(intents) == 3
        for templates in intents.values():
            for template in templates:
                assert set(re.findall(r"\{(\w+)\}", template)) <= set(SLOTS), template
    assert len(set(LABELS)) == len(LABELS) == 15
    assert not any(a != b and f" {b}".startswith(f" {a} ") for a in LABELS for b in LABELS)


@pytest.mark.parametrize("task", list(TASKS))
def test_examples_are_deterministic_balanced_and_disjoint(task):
    train, test = intent_examples(task, train_per_label=40, test_per_label=10, seed=3)
    again = intent_examples(task, train_per_label=40, test_per_label=10, seed=3)
    assert (train, test) == again
    assert intent_examples(task, 40, 10, seed=4)[1] != test
    for label in TASKS[task]:
        assert sum(e.label == label for e in train) == 40 and sum(e.label == label for e in test) == 10
    assert not {e.utterance for e in train} & {e.utterance for e in test}
    assert len({e.utterance for e in train}) == len(train)
    assert all("{" not in e.utterance and e.prompt == f"{e.utterance}\nintent:" for e in train + test)


@pytest.mark.slow
def test_asking_for_more_utterances_than_the_templates_allow_is_an_error():
    with pytest.raises(ValueError, match="distinct utterances"):
        intent_examples("home", train_per_label=5000, test_per_label=10, seed=0)
