"""Scoring long-context probes: an oracle that copies the needle scores 100%, a model that ignores the context scores
chance, and the recurrent-state path gives the same log-likelihoods as re-running the whole sequence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from nlplatform.data.tokenizer import Tokenizer
from nlplatform.eval.long_context.probes import TASKS, ProbeBuilder, build_probes
from nlplatform.eval.long_context.scoring import accuracy_grid, loss_by_position, position_bins, score_probe, summarize
from nlplatform.eval.reader import PromptReader
from nlplatform.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[3]
TOK = Tokenizer()
FILLER = TOK.encode("It was a bright cold day in April, and the clocks were striking thirteen. " * 200)
BUILDER = ProbeBuilder(TOK.encode, FILLER)


class CopyingOracle(nn.Module):
    """Reads the asked needles of a probe (its first one, or all of them for multi-value / multi-query) and predicts
    their values after the prompt: a perfect long-context reader."""

    def __init__(self, probe) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        asked = probe.spans if ("multivalue" in probe.task or "multiquery" in probe.task) else probe.spans[:1]
        values = [re.search(r"(?:: |key is )([0-9a-f-]+)\.", TOK.decode(probe.prompt[s:e])).group(1) for s, e in asked]
        target = probe.prompt + TOK.encode(" " + ", ".join(values))
        self.table = torch.zeros(len(target) + 8, TOK.vocab_size)
        self.table[torch.arange(len(target) - 1), target[1:]] = 50.0  # position t predicts token t + 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[: ids.shape[1]].expand(ids.shape[0], -1, -1)


class ContextBlind(nn.Module):
    """Logits from the last token only (random bigram weights): it cannot know which value the needle held."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(TOK.vocab_size, TOK.vocab_size)
        with torch.no_grad():
            self.table.weight.copy_(
                torch.randn(TOK.vocab_size, TOK.vocab_size, generator=torch.Generator().manual_seed(0))
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)

    def init_state(self, batch_size, max_len, device, dtype) -> None:  # no state: nothing of the context is kept
        return None

    def step(self, ids: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        return self.table(ids), state


def test_an_oracle_that_copies_the_needle_scores_every_probe():
    probes = build_probes(BUILDER, TASKS, lengths=[700], depths=[0.0, 0.5, 1.0], per_cell=1, seed=3)
    scores = [score_probe(CopyingOracle(p), p, TOK.decode) for p in probes]
    assert all(s.exact and s.rank == 1 for s in scores), [s for s in scores if not s.exact or s.rank != 1]
    metrics = summarize(scores, trained_length=512)
    assert metrics["eval/long_context/all/exact_beyond"] == 1.0 and "eval/long_context/all/exact_within" not in metrics


def test_a_model_blind_to_the_context_scores_chance():
    """Ten candidates per probe: top-1 near 1/10 over 300 probes (binomial sd 0.017), never an exact answer."""
    probes = build_probes(
        BUILDER, ["niah_single_number", "niah_multikey_passkey", "passkey"], [400], [0.25, 0.75], per_cell=50, seed=5
    )
    model = ContextBlind()
    scores = [score_probe(model, p, TOK.decode) for p in probes]
    top1 = sum(s.rank == 1 for s in scores) / len(scores)
    assert 0.05 < top1 < 0.15, top1
    assert not any(s.exact for s in scores)
    assert sum(1 / s.rank for s in scores) / len(scores) == pytest.approx(
        sum(1 / k for k in range(1, 11)) / 10, abs=0.05
    )


class BlownUp(nn.Module):
    """A model whose state overflowed: every logit NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.full((*ids.shape, TOK.vocab_size), float("nan"))


def test_non_finite_log_likelihoods_rank_last_and_are_counted():
    """NaN compares False with everything, so a naive rank would put the true answer first: a model whose state blew
    up must score no top-1 at all, and the summary says how many probes were affected."""
    probes = build_probes(BUILDER, ["passkey"], lengths=[300, 700], depths=[0.5], per_cell=2, seed=1)
    scores = [score_probe(BlownUp(), p, TOK.decode) for p in probes]
    assert all(s.rank == s.candidates == 10 and not s.finite and not s.exact for s in scores)
    metrics = summarize(scores, trained_length=512)
    assert metrics["eval/long_context/all/top1_within"] == metrics["eval/long_context/all/top1_beyond"] == 0.0
    assert metrics["eval/long_context/all/nonfinite_within"] == metrics["eval/long_context/all/nonfinite_beyond"] == 1
    assert all(s.finite for s in [score_probe(CopyingOracle(p), p, TOK.decode) for p in probes])
    losses, blown = loss_by_position(BlownUp(), torch.randint(0, 257, (3, 41)))
    assert blown == 3 and losses.shape == (40,) and losses.isnan().all()


@pytest.mark.parametrize("family", ["transformer", "deltanet", "titans", "hope"])
def test_reading_through_the_state_gives_the_log_likelihoods_of_a_full_forward(family):
    """KV cache / recurrent memory: the prompt read once and candidates continued from copies of the state score
    like the whole sequence re-run (float32, within 1e-4 nats)."""
    from nlplatform.registry import build_model

    recipe = load_recipe(
        ROOT / "recipes" / family / "tiny.yaml", ["model.vocab_size=257", "model.d_model=64", "model.n_layers=2"]
    )
    torch.manual_seed(0)
    model = build_model(recipe.model).eval()
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 257, (48,), generator=generator).tolist()  # any tokens: the reading is what is tested
    candidates = [torch.randint(0, 257, (n,), generator=generator).tolist() for n in (1, 5, 7)]

    class Plain(nn.Module):  # the same model without init_state / step
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return self.inner(ids)

    with torch.no_grad():
        fast, slow = PromptReader(model, prompt, 8), PromptReader(Plain(), prompt, 8)
        assert fast.incremental and not slow.incremental
        for candidate in candidates:
            assert fast.logprob(candidate) == pytest.approx(slow.logprob(candidate), abs=1e-4)
        assert fast.greedy(2) == slow.greedy(2)
        # reading a candidate or decoding never changes the state after the prompt
        assert fast.logprob(candidates[2]) == pytest.approx(slow.logprob(candidates[2]), abs=1e-4)


def test_accuracy_grid_and_position_bins_cover_their_inputs():
    probes = build_probes(BUILDER, ["passkey"], [300, 600], [0.0, 1.0], per_cell=1, seed=0)
    scores = [score_probe(CopyingOracle(p), p, TOK.decode) for p in probes]
    lengths, depths, grid = accuracy_grid(scores)
    assert lengths == [300, 600] and depths == [0.0, 1.0] and grid == [[1.0, 1.0], [1.0, 1.0]]
    losses, blown = loss_by_position(ContextBlind(), torch.randint(0, 257, (3, 101)), batch_size=2)
    assert blown == 0
    bins = position_bins(losses, bins=5)
    assert losses.shape == (100,) and bins[0]["start"] == 0 and bins[-1]["end"] == 100
    assert all(a["end"] == b["start"] for a, b in zip(bins, bins[1:]))
