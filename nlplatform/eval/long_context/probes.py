"""Long-context probes: RULER-style needle-in-a-haystack (S-NIAH) and plain passkey retrieval (Nested Learning arXiv
§9.2, Table 1).

A probe is a prompt of exactly ``length`` tokens: filler text with one or more *needles* (sentences that carry a
key and a value) at controlled depths, then a question whose answer is the value(s). Everything is built in token
space, so the length is exact for any tokenizer and every needle's span in the prompt is known (``Probe.spans``).
Generation is deterministic: one seed gives the same probes on any machine.

Tasks (``TASKS``):

- ``niah_single_<kind>``: one needle, one question.
- ``niah_multikey_<kind>``: the needle plus ``distractors`` needles with other keys (the model must pick the key).
- ``niah_multivalue_<kind>``: ``values`` needles with the same key; all values are the answer.
- ``niah_multiquery_<kind>``: ``queries`` needles with different keys; the question asks for all of them.
- ``passkey``: the classic pass-key retrieval in repeated filler sentences ("The grass is green. ...").

``<kind>`` is what the value is: ``passkey`` (5 digits), ``number`` (7 digits) or ``uuid`` (8-4-4-4-12 hex). The
needle of the first key sits at ``depth`` (the fraction of the context before it); the other needles at depths
drawn from the seed. Filler comes from held-out documents of the training corpus, so nothing in it was trained on.

Each probe also carries ``candidates``: the true answer first, then answers of the same form with other values.
Scoring by the rank of the true answer's log-likelihood among them gives tiny models a signal long before they can
reproduce a 7-digit number (see ``nlplatform.eval.long_context``).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

NEEDLE_KINDS = ("passkey", "number", "uuid")
VARIANTS = ("single", "multikey", "multivalue", "multiquery")
TASKS = tuple(f"niah_{v}_{k}" for v in VARIANTS for k in NEEDLE_KINDS) + ("passkey",)

# Keys are common, short words: every tokenizer spells them in a few tokens, and none is rare in English filler.
KEYS = (
    "apple",
    "river",
    "silver",
    "garden",
    "window",
    "candle",
    "forest",
    "harbor",
    "lemon",
    "marble",
    "needle",
    "orange",
    "pepper",
    "rabbit",
    "saddle",
    "thunder",
    "velvet",
    "walnut",
    "yellow",
    "anchor",
    "basket",
    "castle",
    "dragon",
    "falcon",
    "ginger",
    "hammer",
    "island",
    "jacket",
    "kettle",
    "ladder",
    "meadow",
    "nickel",
    "oyster",
    "pillow",
    "quartz",
    "ribbon",
    "spider",
    "tunnel",
    "violet",
    "wizard",
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass(frozen=True)
class Probe:
    task: str
    length: int  # tokens in the prompt (context and question)
    depth: float  # fraction of the context before the first needle
    prompt: list[int]
    answer: str  # the expected continuation's text (values joined by ", ")
    values: tuple[str, ...]  # every value the answer must contain (exact match: all of them, in any order)
    spans: tuple[tuple[int, int], ...]  # [start, end) of each needle in the prompt; the first one is at `depth`
    filler: int  # filler tokens in the prompt; round(depth * filler) of them come before the first needle
    candidates: list[list[int]] = field(repr=False)  # token ids of the true answer (index 0), then distractors
    index: int = 0  # the probe's number within its (task, length, depth) cell


def _value(kind: str, rng: random.Random) -> str:
    if kind == "passkey":
        return str(rng.randrange(10_000, 100_000))
    if kind == "number":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle kind {kind!r}; choose from {', '.join(NEEDLE_KINDS)}")


def _parse_task(task: str) -> tuple[str, str]:
    """``niah_<variant>_<kind>`` -> (variant, kind); ``passkey`` -> ("passkey", "passkey")."""
    if task == "passkey":
        return "passkey", "passkey"
    parts = task.split("_")
    if len(parts) != 3 or parts[0] != "niah" or parts[1] not in VARIANTS or parts[2] not in NEEDLE_KINDS:
        raise ValueError(f"unknown probe task {task!r}; available: {', '.join(TASKS)}")
    return parts[1], parts[2]


@dataclass(frozen=True)
class ProbeSettings:
    distractors: int = 3  # multikey: needles with other keys next to the asked one
    values: int = 2  # multivalue: values stored under the one key
    queries: int = 2  # multiquery: keys asked at once
    candidates: int = 10  # answers ranked by log-likelihood: the true one and candidates - 1 others (chance 1/10)


class ProbeBuilder:
    """Builds probes from a tokenizer's ``encode`` and a long stream of held-out filler tokens."""

    def __init__(
        self, encode: Callable[[str], list[int]], filler: Sequence[int], settings: ProbeSettings | None = None
    ):
        self.encode = encode
        self.filler = list(filler)
        self.settings = settings or ProbeSettings()
        if self.settings.candidates < 2:
            raise ValueError(f"candidates must be >= 2 (the answer and at least one other), got {self.settings}")

    def build(self, task: str, length: int, depth: float, seed: int, index: int = 0) -> Probe:
        """One probe of exactly ``length`` tokens; the same arguments give the same probe."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        variant, kind = _parse_task(task)
        rng = random.Random(f"{seed}/{task}/{length}/{depth:.6f}/{index}")
        keys = rng.sample(KEYS, 1 + max(self.settings.distractors, self.settings.queries))
        s = self.settings
        if variant == "passkey":
            value = _value("passkey", rng)
            needles = [(f" The pass key is {value}. Remember it. {value} is the pass key. ", value)]
            question, asked = " What is the pass key? The pass key is", [value]
        else:
            noun = kind

            def needle(key: str, value: str) -> tuple[str, str]:
                return f" One of the special magic {noun}s for {key} is: {value}. ", value

            if variant == "single":
                needles = [needle(keys[0], _value(kind, rng))]
                asked = [needles[0][1]]
            elif variant == "multikey":
                needles = [needle(k, _value(kind, rng)) for k in keys[: 1 + s.distractors]]
                asked = [needles[0][1]]
            elif variant == "multivalue":
                needles = [needle(keys[0], _value(kind, rng)) for _ in range(s.values)]
                asked = [v for _, v in needles]
            else:  # multiquery
                needles = [needle(k, _value(kind, rng)) for k in keys[: s.queries]]
                asked = [v for _, v in needles]
            asked_keys = keys[: s.queries] if variant == "multiquery" else keys[:1]
            plural = "s" if len(asked) > 1 else ""
            question = (
                f" What {'are all' if plural else 'is'} the special magic {noun}{plural} for {' and '.join(asked_keys)}?"
                f" The special magic {noun}{plural} for {' and '.join(asked_keys)} {'are' if plural else 'is'}:"
            )
        answer = " " + ", ".join(asked)
        return self._assemble(task, length, depth, rng, needles, question, answer, tuple(asked), kind, index)

    def _assemble(self, task, length, depth, rng, needles, question, answer, values, kind, index) -> Probe:
        needle_ids = [self.encode(text) for text, _ in needles]
        question_ids = self.encode(question)
        context = length - len(question_ids)
        n_filler = context - sum(len(ids) for ids in needle_ids)
        if n_filler < 1:
            raise ValueError(
                f"{task}: a prompt of {length} tokens cannot hold its needles and question "
                f"({length - n_filler} tokens); use a longer length"
            )
        filler = self._filler(task, n_filler, rng)
        # Insertion points in filler coordinates: the first needle at `depth`, the others drawn from the seed.
        cuts = [round(depth * n_filler)] + [rng.randint(0, n_filler) for _ in needle_ids[1:]]
        order = sorted(range(len(needle_ids)), key=lambda i: (cuts[i], i))
        prompt: list[int] = []
        spans: dict[int, tuple[int, int]] = {}
        done = 0
        for i in order:
            prompt += filler[done : cuts[i]]
            done = cuts[i]
            spans[i] = (len(prompt), len(prompt) + len(needle_ids[i]))
            prompt += needle_ids[i]
        prompt += filler[done:] + question_ids
        assert len(prompt) == length
        # Other needles' values come first among the wrong answers (multikey: did the model read the right key?).
        others = [" " + v for _, v in needles if v not in values][: self.settings.candidates - 1]
        candidates = [self.encode(answer)] + [self.encode(o) for o in others]
        seen = {answer, *others}
        while len(candidates) < self.settings.candidates:
            other = " " + ", ".join(_value(kind, rng) for _ in values)
            if other not in seen:
                seen.add(other)
                candidates.append(self.encode(other))
        return Probe(
            task,
            length,
            depth,
            prompt,
            answer,
            values,
            tuple(spans[i] for i in range(len(needle_ids))),
            n_filler,
            candidates,
            index,
        )

    def _filler(self, task: str, n: int, rng: random.Random) -> list[int]:
        if task == "passkey":
            unit = self.encode(PASSKEY_FILLER)
            return (unit * (n // len(unit) + 1))[:n]
        if len(self.filler) < n:
            raise ValueError(
                f"{n} filler tokens are needed but the held-out text has only {len(self.filler)}: "
                "use shorter lengths or a corpus with a larger validation split"
            )
        start = rng.randrange(0, len(self.filler) - n + 1)
        return self.filler[start : start + n]


def build_probes(
    builder: ProbeBuilder,
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    per_cell: int,
    seed: int = 0,
) -> list[Probe]:
    """``per_cell`` probes for every (task, length, depth): the grid of the accuracy heatmaps."""
    for task in tasks:
        _parse_task(task)
    if per_cell < 1:
        raise ValueError(f"per_cell must be >= 1, got {per_cell}")
    return [
        builder.build(task, length, depth, seed, index)
        for task in tasks
        for length in lengths
        for depth in depths
        for index in range(per_cell)
    ]
