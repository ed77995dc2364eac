"""Class-incremental intent classification with a generative head: the second continual-learning protocol (in
the manner of the paper's CLINC / Banking77 / DBpedia experiments, Nested Learning arXiv Fig. 6).

The classes arrive in tasks (``intents.TASKS``: three intents each). Stage ``i`` fine-tunes the model on task ``i``'s
training utterances written as text, ``"<utterance>\\nintent: <label><eot>"``, with the same fine-tuning loop as the
domain protocol (the recipe's optimizer, each level at its own period), the loss on the label's tokens only: the
utterance is read, the label is what is learned. The label is generated, not read off a classifier layer: an
example's prediction is the label whose tokens (after a space, then end-of-text) the model finds most likely after
``"<eot><utterance>\\nintent:"``, its log-likelihood summed over the tokens. Prompt and label are tokenized apart, in
training as in scoring, so a tokenizer that could merge across the boundary sees the same tokens both times.

After each stage every task learned so far is tested on its held-out utterances, two ways:

- **class-incremental** (``class_il``, the hard setting): the prediction is among *all* labels seen so far, so a
  model that forgot task 0 when it learned task 1 answers task-1 labels to task-0 requests;
- **task-incremental** (``task_il``): among the labels of the example's own task only.

The stage-by-task accuracy matrices (tasks not yet learned are blank) give average accuracy, average forgetting and
backward transfer (``scores.py``). Chance is ``1 / labels seen`` for class-IL and 1/3 for task-IL.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from nlplatform.eval.continual.intents import TASKS, Example, intent_examples
from nlplatform.eval.continual.scores import continual_scores
from nlplatform.eval.reader import PromptReader

SETTINGS = ("class_il", "task_il")


def training_stream(examples: Sequence[Example], encode, eot_id: int, min_tokens: int, seed: int):
    """(tokens, targets): the examples one after the other (each read after the previous one's end-of-text, as at
    test time), the whole set repeated in fresh orders until the stream holds ``min_tokens`` so long training windows
    fit; ``targets`` marks the label tokens and end-of-text, the only ones the classifier is trained to predict."""
    rng = random.Random(seed)
    ids: list[int] = [eot_id]
    marks: list[bool] = [False]
    order = list(examples)
    while len(ids) < min_tokens:
        for example in order:
            prompt = encode(example.prompt)
            answer = encode(f" {example.label}") + [eot_id]
            ids += prompt + answer
            marks += [False] * len(prompt) + [True] * len(answer)
        rng.shuffle(order)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(marks)


def label_scores(model, examples: Sequence[Example], candidates: dict[str, list[int]], encode, eot_id: int):
    """For each example, ``{label: log p(label tokens | eot, prompt)}`` over ``candidates``: the prompt is read once,
    each label continues from a copy of the state after it."""
    was_training = model.training
    model.eval()
    room = max(len(c) for c in candidates.values())
    out = []
    try:
        with torch.no_grad():  # not inference mode: Titans and HOPE take inner gradient steps while reading
            for example in examples:
                reader = PromptReader(model, [eot_id, *encode(example.prompt)], room)
                out.append({label: reader.logprob(ids) for label, ids in candidates.items()})
    finally:
        model.train(was_training)
    return out


def accuracy(scores: Sequence[dict[str, float]], examples: Sequence[Example], among: Sequence[str]) -> float:
    """Share of examples whose true label is the most likely of the labels ``among`` (ties count as wrong)."""
    right = 0
    for score, example in zip(scores, examples):
        best = max(among, key=lambda label: score[label])
        right += best == example.label and sum(score[label] == score[best] for label in among) == 1
    return right / len(examples)


def run_class_incremental(
    model,
    tokenizer,
    tasks: Sequence[str],
    finetune,
    *,
    train_per_label: int,
    test_per_label: int,
    seq_len: int,
    seed: int,
    progress=None,
) -> dict:
    """The protocol above on ``model`` (changed in place). ``finetune(model, tokens, targets, seed)`` runs one stage
    on a token stream, the loss on the ``targets`` tokens. Returns the report section: tasks, labels, the matrices,
    chance levels, scores per setting."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown intent task(s) {unknown}")
    encode, eot = tokenizer.encode, tokenizer.eot_id
    data = {t: intent_examples(t, train_per_label, test_per_label, seed) for t in tasks}
    T = len(tasks)
    matrices = {s: [[math.nan] * T for _ in range(T)] for s in SETTINGS}
    train_loss, chance = [], []
    for i, task in enumerate(tasks):
        tokens, targets = training_stream(data[task][0], encode, eot, 4 * (seq_len + 1), seed + i)
        train_loss.append(finetune(model, tokens, targets, seed + 1000 + i))
        seen = [label for t in tasks[: i + 1] for label in TASKS[t]]
        chance.append(1 / len(seen))
        candidates = {label: encode(f" {label}") + [eot] for label in seen}
        for j in range(i + 1):
            test = data[tasks[j]][1]
            scores = label_scores(model, test, candidates, encode, eot)
            matrices["class_il"][i][j] = accuracy(scores, test, seen)
            matrices["task_il"][i][j] = accuracy(scores, test, list(TASKS[tasks[j]]))
        if progress is not None:
            progress.update(1)
    return {
        "tasks": list(tasks),
        "labels": {t: list(TASKS[t]) for t in tasks},
        "accuracy": matrices,
        "chance_class_il": chance,  # per stage; task-IL's is 1 / 3 throughout
        "stage_final_train_loss": train_loss,
        "scores": {s: continual_scores(matrices[s], higher_is_better=True) for s in SETTINGS},
    }
