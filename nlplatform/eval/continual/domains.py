"""The domain protocol of the continual suite: text domains learned one after the other, every domain's held-out
perplexity measured after each stage (after Nested Learning's continual-learning experiments, arXiv Fig. 8).

Domains are text the platform has offline, in the eval data (``make eval-data``), each split by document into
training (80%) and held-out (20%) parts: ``encyclopedia`` (BoolQ's Wikipedia passages), ``howto`` (HellaSwag's
WikiHow / ActivityNet contexts with their true endings), ``fiction`` (LAMBADA's book passages), ``science`` (SciQ's
support passages), ``social`` (Social IQa situations with their answers) and ``physical`` (PIQA goals with their
right solutions).

Two ways to read the held-out text (the reading modes):

- ``frozen``: each window of ``seq_len`` tokens from a fresh state, as in training;
- ``ttl`` (test-time learning): the windows of a domain read as one stream through the model's decoding state, so
  in-context levels (Titans' and HOPE's neural memories, the delta-rule states) keep learning across windows; for
  attention the state is a growing KV cache, i.e. the whole stream as context.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from nlplatform.errors import UserError
from nlplatform.eval.continual.scores import continual_scores


def _first(*keys: str) -> Callable[[dict], str]:
    return lambda row: " ".join(str(row[k]) for k in keys)


# domain -> (eval dataset, row -> text)
DOMAINS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "encyclopedia": ("boolq", _first("passage")),
    "howto": ("hellaswag", lambda r: f"{r['ctx']} {r['endings'][int(r['label'])]}"),
    "fiction": ("lambada", _first("text")),
    "science": ("sciq", _first("support")),
    "social": ("social_iqa", lambda r: f"{r['context']} {r['question']} {r['answer' + 'ABC'[int(r['label']) - 1]]}"),
    "physical": ("piqa", lambda r: f"{r['goal']} {r['sol1'] if int(r['label']) == 0 else r['sol2']}"),
}


def domain_texts(domain: str) -> list[str]:
    """The documents of ``domain`` from the offline eval data (fetched on first use)."""
    from nlplatform.eval.harness.data import dataset_file, require_eval_data

    dataset, to_text = DOMAINS[domain]
    path = dataset_file(dataset, require_eval_data())
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from datasets import Dataset

        rows = Dataset.from_file(str(path))
    return [text for text in (to_text(r).strip() for r in rows) if text]


def split_documents(docs: list[str], seed: int, held_out: float = 0.2) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: a seeded shuffle, the last ``held_out`` share held out."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    cut = len(docs) - max(1, round(held_out * len(docs)))
    return [docs[i] for i in order[:cut]], [docs[i] for i in order[cut:]]


def stream(docs: list[str], encode, eot_id: int) -> torch.Tensor:
    """The documents' tokens, each followed by end-of-text, as one 1-D tensor."""
    ids: list[int] = []
    for doc in docs:
        ids += encode(doc) + [eot_id]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, seq_len: int, n: int, what: str) -> torch.Tensor:
    """The first ``n`` consecutive windows of ``seq_len + 1`` tokens (inputs and shifted targets)."""
    if tokens.numel() < n * seq_len + 1:
        raise UserError(
            f"{what} has {tokens.numel():,} tokens, fewer than {n} windows of {seq_len}: use fewer (--limit)"
        )
    return torch.stack([tokens[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)])


def held_out_loss(model, windows: torch.Tensor, mode: str, batch_size: int = 8) -> float:
    """Mean next-token loss over ``windows`` [N, T + 1]: each from a fresh state (``frozen``) or all of them as one
    stream through the decoding state (``ttl``)."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():  # not inference mode: Titans and HOPE take inner gradient steps while reading
        if mode == "frozen":
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(batch[:, :-1]).float()
                total += float(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum"))
                count += batch[:, 1:].numel()
            return total / count
        T = windows.shape[1] - 1
        state = model.init_state(1, T * windows.shape[0], device, next(model.parameters()).dtype)
        for window in windows:
            window = window.to(device)[None]
            logits, state = model.step(window[:, :-1], state)
            total += float(F.cross_entropy(logits.float().transpose(1, 2), window[:, 1:], reduction="sum"))
            count += T
    return total / count


def run_domains(
    model,
    tokenizer,
    domains: Sequence[str],
    modes: Sequence[str],
    finetune,
    *,
    corpus: list[int],
    seq_len: int,
    eval_windows: int,
    seed: int,
    progress=None,
) -> dict:
    """The protocol on ``model`` (changed in place): measure, then per domain ``finetune(model, tokens, None, seed)``
    on its training part and measure again; measured are ``eval_windows`` held-out windows of every domain and of
    ``corpus`` (the checkpoint corpus's test split, in tokens) in every reading mode. Returns the report section:
    stages, columns, the stage-by-column perplexity matrix per mode, the stages' last training losses and the scores
    per mode (from the domain columns, the start row as the forward-transfer baseline, and the corpus's perplexity
    at the start and at the end)."""
    encode, eot = tokenizer.encode, tokenizer.eot_id
    train_streams, held_out = {}, {}
    for i, domain in enumerate(domains):
        train_docs, held_docs = split_documents(domain_texts(domain), seed + i)
        train_streams[domain] = stream(train_docs, encode, eot)
        held_out[domain] = windows(
            stream(held_docs, encode, eot), seq_len, eval_windows, f"the held-out part of domain {domain!r}"
        )
    held_out["corpus"] = windows(
        torch.tensor(corpus, dtype=torch.long), seq_len, eval_windows, "the checkpoint corpus's test split"
    )
    columns = [*domains, "corpus"]

    losses: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    stage_loss: list[float] = []
    stages = ["start", *domains]
    for stage, name in enumerate(stages):
        if stage > 0:
            stage_loss.append(finetune(model, train_streams[name], None, seed + stage))
        for mode in modes:
            losses[mode].append([held_out_loss(model, held_out[c], mode) for c in columns])
        if progress is not None:
            progress.update(1)

    perplexity, scores = {}, {}
    T = len(domains)
    for mode in modes:
        ppl = [[math.exp(x) for x in row] for row in losses[mode]]
        perplexity[mode] = ppl
        scores[mode] = continual_scores([row[:T] for row in ppl[1:]], higher_is_better=False, baseline=ppl[0][:T])
        scores[mode].update(corpus_ppl_start=ppl[0][T], corpus_ppl_end=ppl[-1][T])
    return {
        "stages": stages,
        "columns": columns,
        "perplexity": perplexity,
        "stage_final_train_loss": stage_loss,
        "scores": scores,
    }
