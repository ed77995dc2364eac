"""Kill-and-resume exactness, the level scheduler inside a real Lightning run, and divergence handling."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from nlplatform.errors import TrainingDiverged
from nlplatform.levels import Level
from nlplatform.models.transformer import Transformer
from nlplatform.recipe import load_recipe
from nlplatform.train.run import train
from tests.train.conftest import FAST, TINY_RECIPE, Interrupted, KillAt, needs_corpus

pytestmark = needs_corpus


def recipe(tmp_path, *overrides: str):
    return load_recipe(TINY_RECIPE, [*FAST, f"output_dir={tmp_path / 'runs'}", "tracking.enabled=false", *overrides])


def history(run_dir) -> tuple[list, list]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    h = state["callbacks"]["History"]
    return h["train"], h["val"]


@pytest.mark.slow
def test_killed_and_resumed_run_matches_the_uninterrupted_run(tmp_path, capsys):
    """A run killed after 8 steps and resumed with trainer.resume=auto has exactly the losses of an uninterrupted run."""
    common = ("trainer.max_steps=12", "trainer.val_check_interval=4")
    straight = train(recipe(tmp_path, *common, "tracking.run_name=straight"))

    with pytest.raises(Interrupted):
        train(recipe(tmp_path, *common, "tracking.run_name=killed"), callbacks=(KillAt(8),))
    killed = torch.load(tmp_path / "runs/tiny/killed/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert killed["global_step"] == 8
    capsys.readouterr()
    resumed = train(recipe(tmp_path, *common, "tracking.run_name=killed", "trainer.resume=auto"))
    err = capsys.readouterr().err
    assert "resuming from" in err and "last.ckpt at step 8" in err

    assert resumed.run_dir == straight.run_dir.parent / "killed"
    (train_a, val_a), (train_b, val_b) = history(straight.run_dir), history(resumed.run_dir)
    assert [s for s, _ in train_b] == list(range(1, 13))
    torch.testing.assert_close(torch.tensor([v for _, v in train_b]), torch.tensor([v for _, v in train_a]))
    torch.testing.assert_close(torch.tensor([v[1] for v in val_b]), torch.tensor([v[1] for v in val_a]))
    assert resumed.summary["val_loss"] == pytest.approx(straight.summary["val_loss"], rel=1e-6)


def test_slow_level_steps_every_fourth_optimizer_step_in_a_lightning_run(tmp_path, monkeypatch):
    """With accumulation 2, a level whose chunk is 4 x T_step moves only at steps 4 and 8; the rest moves every step."""

    def split_levels(self):
        slow = [p for n, p in self.named_parameters() if ".mlp." in n]
        slow_ids = {id(p) for p in slow}
        fast = [p for p in self.parameters() if id(p) not in slow_ids]
        t_step = 64 * 4 * 2  # seq_len x batch x accumulation (one process)
        return [
            Level("fast", chunk_size=None, scope="persistent", params=fast),
            Level("mlp", chunk_size=4 * t_step, scope="persistent", params=slow),
        ]

    monkeypatch.setattr(Transformer, "levels", split_levels)
    moved: dict[str, list[int]] = {"fast": [], "mlp": []}

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.prev = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx % 2 == 0:  # first micro-batch of an accumulation pair: no optimizer step yet
                return
            now = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
            for level, pick in (("mlp", lambda n: ".mlp." in n), ("fast", lambda n: ".mlp." not in n)):
                if any(not torch.equal(now[n], self.prev[n]) for n in now if pick(n)):
                    moved[level].append(trainer.global_step)
            self.prev = now

    result = train(
        recipe(
            tmp_path,
            "data.batch_size=4",
            "trainer.accumulate_grad_batches=2",
            "trainer.max_steps=8",
            "trainer.val_check_interval=8",
        ),
        callbacks=(Watch(),),
    )
    assert moved["fast"] == list(range(1, 9))
    assert moved["mlp"] == [4, 8]
    rows = {r["level"]: r for r in result.summary["levels"]}
    assert rows["mlp"]["period_steps"] == 4 and rows["mlp"]["updates"] == 2 and rows["fast"]["updates"] == 8


def test_training_clips_each_steps_gradient_through_the_level_scheduler_only(tmp_path, monkeypatch):
    """The Trainer clips nothing itself; every optimizer step's gradient is clipped to trainer.gradient_clip_val by
    the level scheduler, before slow levels hold theirs back (tests/test_levels.py checks what that guarantees)."""
    from tests.test_levels import record_clipping

    calls = record_clipping(monkeypatch)
    seen = {}

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["trainer_clip"] = trainer.gradient_clip_val

    train(
        recipe(tmp_path, "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.gradient_clip_val=0.01"),
        callbacks=(Watch(),),
    )
    assert seen["trainer_clip"] is None
    assert [c for c, _ in calls] == [0.01] * 3
    assert all(norm <= 0.01 * (1 + 1e-5) for _, norm in calls)


def test_nan_loss_stops_with_the_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN loss stops training with the failing step and the last checkpoint named."""
    from nlplatform.train.module import LMModule

    original = LMModule._loss

    def poisoned(self, batch):
        loss, logits, targets = original(self, batch)
        if self.training and self.trainer.global_step == 5:
            loss = loss * float("nan")
        return loss, logits, targets

    monkeypatch.setattr(LMModule, "_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 6.*last good checkpoint: .*last\.ckpt"):
        train(recipe(tmp_path, "trainer.max_steps=10", "trainer.val_check_interval=4"))
