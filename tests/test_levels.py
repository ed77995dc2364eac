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


def test_clipping_before_buffering_keeps_a_slow_levels_release_out_of_every_other_levels_step():
    """With clipping on, each step's gradient is clipped (one norm over every level's fresh gradient) before the slow
    level holds its share back: the fast level's gradient at the slow level's release step is its clipped fresh
    gradient, exactly as on the steps before (the released sum never enters a norm), and the slow level releases the
    sum of its clipped per-step gradients. Clipping after the release, as a global clip would, shrinks the fast level
    on that step."""
    fast, slow, levels = two_levels()
    sched = LevelScheduler(levels, T_STEP)
    clip = 1.0
    for step in range(8):
        g_fast, g_slow = grad_at(step, fast.shape), grad_at(step, slow.shape)
        fast.grad, slow.grad = g_fast.clone(), g_slow.clone()
        norm = torch.sqrt(g_fast.square().sum() + g_slow.square().sum())
        scale = min(1.0, clip / norm.item())
        due = sched.before_optimizer_step(step, max_grad_norm=clip)
        assert sched.last_grad_norm == pytest.approx(norm.item())
        torch.testing.assert_close(fast.grad, g_fast * scale)  # whatever the slow level releases on this step
        if "slow" in due:
            held = sum(
                grad_at(s, slow.shape)
                * min(1.0, clip / (grad_at(s, (3,)).square().sum() + grad_at(s, (2, 2)).square().sum()).sqrt().item())
                for s in range(step - 3, step + 1)
            )
            torch.testing.assert_close(slow.grad, held)
            # a global clip after the release sees the sum of the chunk's raw slow gradients beside the fast level's
            # fresh one, and shrinks the fast level's step on this step only
            raw_sum = sum(grad_at(s, slow.shape) for s in range(step - 3, step + 1))
            global_scale = min(1.0, clip / torch.sqrt(g_fast.square().sum() + raw_sum.square().sum()).item())
            assert global_scale < 0.9 * scale
        fast.grad = slow.grad = None
    assert sched.updates == {"fast": 8, "slow": 2}


def record_clipping(monkeypatch) -> list[tuple[float | None, float]]:
    """Wrap ``LevelScheduler.before_optimizer_step``: each call appends (the clip value it was given, the norm of all
    gradients it hands the optimizer)."""
    calls = []
    real = LevelScheduler.before_optimizer_step

    def wrapped(self, step, max_grad_norm=None, sum_over_shards=None):
        due = real(self, step, max_grad_norm, sum_over_shards)
        grads = [p.grad for lv in self.levels for p in lv.params if p.grad is not None]
        calls.append((max_grad_norm, float(torch.nn.utils.get_total_norm(grads))))
        return due

    monkeypatch.setattr(LevelScheduler, "before_optimizer_step", wrapped)
    return calls


def test_the_continual_suites_fine_tuning_clips_through_the_level_scheduler(monkeypatch):
    """The continual suite's fine-tuning clips with the same function as training: every optimizer step goes through
    ``before_optimizer_step`` with the recipe's clip value, and the gradients the optimizer gets are within it."""
    from nlplatform.eval.continual.suite import ContinualSettings, finetune
    from nlplatform.recipe import load_recipe
    from nlplatform.registry import build_model
    from tests.train.conftest import FAST, TINY_RECIPE

    recipe = load_recipe(
        TINY_RECIPE, [*FAST, "model.vocab_size=50", "data.seq_len=16", "trainer.gradient_clip_val=0.01"]
    )
    torch.manual_seed(0)
    model = build_model(recipe.model)
    calls = record_clipping(monkeypatch)
    tokens = torch.randint(0, 50, (400,), generator=torch.Generator().manual_seed(0))
    finetune(model, tokens, recipe, ContinualSettings(stage_steps=3, batch_size=2), seed=0)
    assert [c for c, _ in calls] == [0.01] * 3
    assert all(norm <= 0.01 * (1 + 1e-5) for _, norm in calls)


def test_each_persistent_level_gets_its_own_parameter_groups_with_decay_on_matrices_only():
    """The optimizer gets one parameter group per persistent level and weight-decay setting, named after the level
    (the level monitor and the schedule read them): matrices decay, vectors do not, in-context levels are absent."""
    from nlplatform.config import OptimConfig
    from nlplatform.optim import level_param_groups

    class TwoLevels(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
            self.fast = nn.Parameter(torch.zeros(2))

        def levels(self):
            return [
                Level("a", None, "persistent", [self.a]),
                Level("b", 4 * T_STEP, "persistent", [self.b]),
                Level("fast", 8, "in_context", [self.fast]),
            ]

    groups, _ = level_param_groups(TwoLevels(), OptimConfig(lr=1e-3, weight_decay=0.1))
    assert [(g["level"], g["weight_decay"], g["lr"]) for g in groups] == [("a", 0.1, 1e-3), ("b", 0.0, 1e-3)]


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
