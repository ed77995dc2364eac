"""The level scheduler: periods from chunk sizes, summed gradients, frequencies, checkpointable state."""

import pytest
import torch
from torch import nn

from nlplatform.levels import Level, LevelScheduler, check_levels, frequencies, step_period

T_STEP = 64  # tokens per optimizer step in these tests


def two_levels(slow_chunk: int = 4 * T_STEP):
    fast, slow = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    levels = [
        Level("fast", chunk_size=None, scope="persistent", params=[fast]),
        Level("slow", chunk_size=slow_chunk, scope="persistent", params=[slow]),
    ]
    return fast, slow, levels


def grad_at(step: int, shape) -> torch.Tensor:
    return torch.full(shape, float(step + 1))


@pytest.mark.parametrize(
    ("chunk", "period"),
    [(None, 1), (1, 1), (T_STEP // 2, 1), (T_STEP, 1), (2 * T_STEP, 2), (4 * T_STEP, 4), (int(4.4 * T_STEP), 4)],
)
def test_period_is_chunk_over_tokens_per_step_rounded_at_least_one(chunk, period):
    """A persistent level steps every max(1, round(C / T_step)) optimizer steps."""
    assert step_period(Level("x", chunk, "persistent"), T_STEP) == period


def test_level_four_times_the_step_updates_every_fourth_step_with_summed_gradients():
    """With C = 4 T_step, the slow level's gradient is withheld for 3 steps and released as the sum of all 4."""
    fast, slow, levels = two_levels()
    sched = LevelScheduler(levels, T_STEP)
    opt = torch.optim.SGD([fast, slow], lr=1.0)
    for step in range(12):
        fast.grad, slow.grad = grad_at(step, fast.shape), grad_at(step, slow.shape)
        due = sched.before_optimizer_step(step)
        assert torch.equal(fast.grad, grad_at(step, fast.shape))  # the fast level is never held back
        if (step + 1) % 4:
            assert due == ["fast"] and slow.grad is None
        else:
            assert due == ["fast", "slow"]
            expected = sum(step_ + 1 for step_ in range(step - 3, step + 1))
            assert torch.equal(slow.grad, torch.full((2, 2), float(expected)))
        before = slow.detach().clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(slow, before) == bool((step + 1) % 4)  # the slow weights move only when due
    assert sched.updates == {"fast": 12, "slow": 3}
    # SGD with lr 1: the slow weights moved by minus the sum of all 12 gradients, in 3 updates.
    assert torch.equal(slow.detach(), torch.full((2, 2), -float(sum(range(1, 13)))))


def test_state_dict_resumes_mid_chunk_exactly():
    """Saving the scheduler mid-chunk and loading it into a new one gives the same released gradient."""
    fast, slow, levels = two_levels()
    sched = LevelScheduler(levels, T_STEP)
    for step in range(2):
        slow.grad = grad_at(step, slow.shape)
        sched.before_optimizer_step(step)
    state = sched.state_dict()
    fast2, slow2, levels2 = two_levels()
    resumed = LevelScheduler(levels2, T_STEP)
    resumed.load_state_dict(state)
    for step in range(2, 4):
        slow2.grad = grad_at(step, slow2.shape)
        resumed.before_optimizer_step(step)
    assert torch.equal(slow2.grad, torch.full((2, 2), 10.0))  # 1 + 2 + 3 + 4


def test_frequency_is_slowest_chunk_over_chunk():
    """f = C_max / C: the slowest level has frequency 1, faster ones proportionally more."""
    _, _, levels = two_levels(slow_chunk=16 * T_STEP)
    levels.append(Level("memory", chunk_size=16, scope="in_context"))
    f = frequencies(levels, T_STEP)
    assert f == {"fast": 16.0, "slow": 1.0, "memory": 16 * T_STEP / 16}


def test_table_has_one_row_per_level_with_period_and_updates():
    """The logged table shows every level, persistent ones with their period and update count."""
    fast, slow, levels = two_levels()
    levels.append(Level("memory", chunk_size=16, scope="in_context"))
    rows = {r["level"]: r for r in LevelScheduler(levels, T_STEP).table(levels)}
    assert set(rows) == {"fast", "slow", "memory"}
    assert rows["slow"]["period_steps"] == 4 and rows["slow"]["params"] == 4 and rows["slow"]["updates"] == 0
    assert rows["memory"]["period_steps"] is None and rows["memory"]["scope"] == "in_context"


def test_check_levels_rejects_orphans_overlaps_and_in_context_chunks_beyond_the_window():
    """Every trainable parameter must be in exactly one level; in-context chunks must fit in the window."""
    model = nn.Linear(2, 2)
    weight, bias = model.weight, model.bias
    with pytest.raises(ValueError, match="not declared"):
        check_levels([Level("w", None, "persistent", params=[weight])], model, seq_len=32)
    with pytest.raises(ValueError, match="both"):
        check_levels(
            [Level("a", None, "persistent", params=[weight, bias]), Level("b", None, "persistent", params=[bias])],
            model,
            seq_len=32,
        )
    with pytest.raises(ValueError, match="in-context"):
        check_levels(
            [Level("a", None, "persistent", params=[weight, bias]), Level("m", 64, "in_context")], model, seq_len=32
        )
    with pytest.raises(ValueError, match="chunk_size"):
        Level("bad", chunk_size=0, scope="persistent")
