"""Long-context probes: deterministic, exactly as long as asked, needles where they say they are."""

from __future__ import annotations

import pytest

from nlplatform.data.tokenizer import Tokenizer
from nlplatform.eval.long_context.probes import TASKS, ProbeBuilder, ProbeSettings, build_probes

TOK = Tokenizer()
FILLER = TOK.encode("It was a bright cold day in April, and the clocks were striking thirteen. " * 200)


def builder(**settings) -> ProbeBuilder:
    return ProbeBuilder(TOK.encode, FILLER, ProbeSettings(**settings))


@pytest.mark.parametrize("task", TASKS)
def test_probes_are_deterministic_exactly_as_long_as_asked_and_hold_their_needles(task):
    a = build_probes(builder(), [task], lengths=[600, 1000], depths=[0.0, 0.5, 1.0], per_cell=2, seed=7)
    b = build_probes(builder(), [task], lengths=[600, 1000], depths=[0.0, 0.5, 1.0], per_cell=2, seed=7)
    assert a == b and len(a) == 12
    assert build_probes(builder(), [task], [600], [0.5], 1, seed=8)[0].prompt != a[2].prompt  # the seed matters
    for probe in a:
        assert len(probe.prompt) == probe.length
        text = TOK.decode(probe.prompt)
        needles = [TOK.decode(probe.prompt[start:end]) for start, end in probe.spans]
        assert all(("special magic" in n or "pass key" in n) for n in needles)
        assert probe.values[0] in needles[0]  # the first needle is the asked one
        assert all(value in text for value in probe.values)
        assert TOK.decode(probe.candidates[0]) == probe.answer
        assert len({tuple(c) for c in probe.candidates}) == len(probe.candidates) == 10


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_the_first_needle_sits_at_its_depth_in_the_context(depth):
    """Depth is the share of the filler before the needle: 0 puts it first, 1 right before the question."""
    for task in ("niah_single_number", "niah_multikey_uuid", "niah_multiquery_passkey", "passkey"):
        probe = builder().build(task, 2000, depth, seed=0)
        start = probe.spans[0][0]
        needles_before = sum(e - s for s, e in probe.spans if s < start)
        assert start - needles_before == round(depth * probe.filler), task
        assert probe.filler == probe.length - sum(e - s for s, e in probe.spans) - len(question_tokens(probe))
        if depth == 1.0:  # nothing but other needles between it and the question
            tail = probe.prompt[probe.spans[0][1] : probe.length - len(question_tokens(probe))]
            assert len(tail) == sum(e - s for s, e in probe.spans if s > start)


def question_tokens(probe) -> list[int]:
    text = TOK.decode(probe.prompt)
    return TOK.encode(text[text.rindex(" What ") :])


def test_multikey_probes_rank_the_other_keys_values_among_the_wrong_answers():
    probe = builder(distractors=3).build("niah_multikey_number", 1500, 0.3, seed=1)
    assert len(probe.spans) == 4 and len(probe.values) == 1
    wrong = {TOK.decode(c).strip() for c in probe.candidates[1:]}
    others = {TOK.decode(probe.prompt[s:e]).split(": ")[1].split(".")[0] for s, e in probe.spans[1:]}
    assert others <= wrong


def test_multivalue_and_multiquery_answers_name_every_value():
    for task, n in (("niah_multivalue_passkey", 3), ("niah_multiquery_passkey", 3)):
        probe = builder(values=n, queries=n).build(task, 1200, 0.5, seed=2)
        assert len(probe.values) == n and len(probe.spans) == n
        assert probe.answer == " " + ", ".join(probe.values)


def test_impossible_probes_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="cannot hold its needles and question"):
        builder().build("niah_single_uuid", 60, 0.5, seed=0)
    with pytest.raises(ValueError, match="held-out text has only"):
        ProbeBuilder(TOK.encode, FILLER[:500]).build("niah_single_number", 2000, 0.5, seed=0)
    with pytest.raises(ValueError, match="unknown probe task 'niah_single_digits'"):
        builder().build("niah_single_digits", 600, 0.5, seed=0)
    with pytest.raises(ValueError, match="depth must be in"):
        builder().build("passkey", 600, 1.5, seed=0)
