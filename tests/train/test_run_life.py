"""A run's life: ``trainer.resume=auto`` never takes over a finished, running or different run; a resume rewrites
neither the recipe nor the tokenizer and is recorded in run.json; a checkpoint other than ``last.ckpt`` forks a new
run; two runs started at once get two folders; resumes keep tokens per step or are refused.

Tiny Transformer++ (``data.seq_len=64``, batch 2), at most 6 steps per run, in process."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from nlplatform.errors import RunStopped, UserError
from nlplatform.recipe import load_recipe
from nlplatform.train import runs
from nlplatform.train.run import _resolve_run, train
from tests.train.conftest import FAST, TINY_RECIPE, Interrupted, KillAt, needs_corpus

pytestmark = needs_corpus

SMALL = [*FAST, "data.batch_size=2", "data.val_batches=2", "tracking.enabled=false"]


def recipe(tmp_path, *overrides: str):
    return load_recipe(TINY_RECIPE, [*SMALL, f"output_dir={tmp_path / 'runs'}", *overrides])


def steps_of(ckpt) -> list[int]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return [s for s, _ in state["callbacks"]["History"]["train"]]


@pytest.fixture(scope="module")
def finished_and_killed(tmp_path_factory):
    """One finished run (4 steps, validation every 2) and one stopped after its step-2 checkpoint."""
    tmp = tmp_path_factory.mktemp("life")
    common = ("trainer.max_steps=4", "trainer.val_check_interval=2")
    done = train(recipe(tmp, *common, "tracking.run_name=done"))
    with pytest.raises(Interrupted):
        train(recipe(tmp, *common, "tracking.run_name=killed"), callbacks=(KillAt(2),))
    return tmp, done.run_dir, done.run_dir.parent / "killed"


def _snapshot(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} | {
        f"checkpoints/{p.name}": p.read_bytes() for p in (run_dir / "checkpoints").iterdir()
    }


def test_a_run_folder_records_finished_and_drops_its_lock(finished_and_killed):
    _, done, killed = finished_and_killed
    assert json.loads((done / "run.json").read_text())["finished"]
    assert not (done / runs.LOCK).exists() and not (killed / runs.LOCK).exists()  # released however the run ended
    assert runs.finished(done) and not runs.finished(killed)


def test_auto_continues_only_the_unfinished_run_and_never_touches_the_finished_one(finished_and_killed, capsys):
    tmp, done, killed = finished_and_killed
    before = _snapshot(done)
    recipe_before = (killed / "recipe.yaml").read_bytes()
    capsys.readouterr()
    resumed = train(recipe(tmp, "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.resume=auto"))
    err = capsys.readouterr().err
    assert resumed.run_dir == killed.resolve()
    assert f"continuing the newest unfinished transformer/tiny run, {killed.resolve()}" in err
    assert _snapshot(done) == before  # the finished run is not reopened, not even rewritten
    assert steps_of(killed / "checkpoints" / "last.ckpt") == [1, 2, 3, 4]
    assert (killed / "recipe.yaml").read_bytes() == recipe_before  # a resume never rewrites the recipe
    meta = json.loads((killed / "run.json").read_text())
    assert [r["step"] for r in meta["resumes"]] == [2] and meta["finished"]

    # now both are finished: auto starts a new run and says so
    capsys.readouterr()
    fresh = train(recipe(tmp, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.resume=auto"))
    assert "no unfinished transformer/tiny run to continue" in capsys.readouterr().err
    assert fresh.run_dir not in (done.resolve(), killed.resolve()) and steps_of(
        fresh.run_dir / "checkpoints" / "last.ckpt"
    ) == [1, 2]


def test_auto_with_a_finished_runs_name_is_refused_and_an_explicit_path_needs_more_steps(finished_and_killed):
    tmp, done, _ = finished_and_killed
    with pytest.raises(UserError, match="auto never reopens a finished run"):
        train(recipe(tmp, "tracking.run_name=done", "trainer.resume=auto", "trainer.max_steps=6"))
    last = done / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="finished at step 4; to train it further raise trainer.max_steps"):
        train(recipe(tmp, "trainer.max_steps=4", "trainer.val_check_interval=2", f"trainer.resume={last}"))


def test_a_changed_learning_rate_is_refused_with_the_difference_and_nothing_is_rewritten(tmp_path):
    common = ("trainer.max_steps=4", "trainer.val_check_interval=2", "tracking.run_name=r")
    with pytest.raises(Interrupted):
        train(recipe(tmp_path, *common), callbacks=(KillAt(2),))
    run_dir = tmp_path / "runs" / "tiny" / "r"
    before = _snapshot(run_dir)
    with pytest.raises(UserError, match=r"another recipe \(optim.lr: checkpoint 0.003, now 0.001\)"):
        train(recipe(tmp_path, *common, "optim.lr=1e-3", "trainer.resume=auto"))
    assert _snapshot(run_dir) == before and not (run_dir / runs.LOCK).exists()
    # another batch at the same world size changes the tokens per optimizer step: refused, naming both
    with pytest.raises(UserError, match="trained at 128 tokens per optimizer step"):
        train(recipe(tmp_path, *common, "data.batch_size=4", "trainer.resume=auto"))
    assert _snapshot(run_dir) == before


def test_a_running_run_is_never_continued_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    common = ("trainer.max_steps=4", "trainer.val_check_interval=2", "tracking.run_name=r")
    with pytest.raises(Interrupted):
        train(recipe(tmp_path, *common), callbacks=(KillAt(2),))
    run_dir = (tmp_path / "runs" / "tiny" / "r").resolve()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"host": runs._HOST, "pid": sleeper.pid, "started": "now"}
        (run_dir / runs.LOCK).write_text(json.dumps(lock))
        with pytest.raises(UserError, match=f"is running now \\(pid {sleeper.pid}"):
            _resolve_run(recipe(tmp_path, f"trainer.resume={run_dir / 'checkpoints' / 'last.ckpt'}"))
        capsys.readouterr()
        fresh = _resolve_run(recipe(tmp_path, "trainer.resume=auto"))
        assert fresh.ckpt is None and fresh.run_dir != run_dir  # the running run is skipped: a new one starts
        assert "(0 finished, 1 running); starting a new run" in capsys.readouterr().err
        runs.abandon(fresh.run_dir)
    finally:
        sleeper.kill()
        sleeper.wait()
    # its process is gone: the lock is stale, taken over with a message
    resolved = _resolve_run(recipe(tmp_path, *common, "trainer.resume=auto"))
    assert resolved.run_dir == run_dir and "no longer runs" in capsys.readouterr().err
    assert runs.read_lock(run_dir).pid == os.getpid()
    runs.release(run_dir)
    assert not (run_dir / runs.LOCK).exists()


def test_a_best_checkpoint_forks_a_new_run_and_leaves_its_run_alone(finished_and_killed, capsys):
    tmp, done, _ = finished_and_killed
    best = next(p for p in (done / "checkpoints").iterdir() if p.name.startswith("step"))
    step = torch.load(best, map_location="cpu", weights_only=True)["global_step"]
    before = _snapshot(done)
    capsys.readouterr()
    fork = train(recipe(tmp, "trainer.max_steps=6", "trainer.val_check_interval=2", f"trainer.resume={best}"))
    assert f"forking a new run from {best.resolve()} at step {step}" in capsys.readouterr().err
    assert fork.run_dir.name == f"done-from-step{step}" and _snapshot(done) == before
    meta = json.loads((fork.run_dir / "run.json").read_text())
    assert meta["forked_from"] == {"checkpoint": str(best), "step": step}
    assert steps_of(fork.run_dir / "checkpoints" / "last.ckpt")[-1] == 6
    again = train(recipe(tmp, "trainer.max_steps=6", "trainer.val_check_interval=2", f"trainer.resume={best}"))
    assert again.run_dir.name == f"done-from-step{step}-2"  # a second fork of the same checkpoint gets its own folder


def _reserve(args) -> str:
    root, name, start = args
    start.wait()
    return str(runs.reserve(root, name, explicit=False)[0])


def test_two_runs_reserving_one_name_at_once_get_two_folders(tmp_path):
    """What two runs of one recipe started in the same second do: claim <name> at the same moment."""
    ctx = multiprocessing.get_context("fork")  # the workers only create folders
    with ctx.Manager() as manager:
        start = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            got = pool.map(_reserve, [(tmp_path, "hope-tiny-20261204-101010", start)] * 4)
    assert sorted(os.path.basename(g) for g in got) == [
        "hope-tiny-20261204-101010",
        "hope-tiny-20261204-101010-2",
        "hope-tiny-20261204-101010-3",
        "hope-tiny-20261204-101010-4",
    ]
    with pytest.raises(UserError, match="already holds a run"):
        runs.reserve(tmp_path, "hope-tiny-20261204-101010", explicit=True)


def test_a_recipe_refused_after_the_folder_was_reserved_leaves_nothing(tmp_path):
    """HOPE at data.seq_len=64 with a vocabulary smaller than the tokenizer's is refused (the check no longer
    depends on the window), after the folder was reserved: the folder and the folders made for it are gone."""
    cfg = load_recipe(
        TINY_RECIPE.parent.parent / "hope" / "tiny.yaml",
        [*SMALL, f"output_dir={tmp_path / 'runs'}", "model.vocab_size=100"],
    )
    with pytest.raises(Exception, match="model.vocab_size=100 is smaller than the tokenizer's 257 ids"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


class SignalAt(L.Callback):
    """Sends this process ``signum`` at the start of step ``step + 1``, as a scheduler would mid-step."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.slow
def test_sigterm_and_interval_checkpoints_resume_with_the_uninterrupted_losses(tmp_path):
    """SIGTERM mid-step 2 saves last.ckpt after that step (no validation there) and stops with 143; a job killed at
    step 5 keeps the step-4 checkpoint trainer.checkpoint_every_steps=2 wrote; each resumes with auto to the losses
    of an uninterrupted run (tolerance: float32 round-off of the same operations, 1e-6 relative)."""
    common = ("trainer.max_steps=6", "trainer.val_check_interval=3")
    straight = train(recipe(tmp_path, *common, "tracking.run_name=straight"))
    expected = torch.load(straight.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["History"]

    with pytest.raises(RunStopped) as stopped:
        train(recipe(tmp_path, *common, "tracking.run_name=term"), callbacks=(SignalAt(1, signal.SIGTERM),))
    assert stopped.value.exit_code == 143 and "stopped by SIGTERM at step 2" in str(stopped.value)
    term = tmp_path / "runs" / "tiny" / "term"
    assert steps_of(term / "checkpoints" / "last.ckpt") == [1, 2] and not runs.finished(term)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back

    with pytest.raises(Interrupted):
        train(
            recipe(tmp_path, *common, "tracking.run_name=every", "trainer.checkpoint_every_steps=2"),
            callbacks=(KillAt(4),),
        )
    every = tmp_path / "runs" / "tiny" / "every"
    assert steps_of(every / "checkpoints" / "last.ckpt") == [1, 2, 3, 4]

    for name in ("term", "every"):
        resumed = train(recipe(tmp_path, *common, f"tracking.run_name={name}", "trainer.resume=auto"))
        got = torch.load(resumed.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["History"]
        assert [s for s, _ in got["train"]] == list(range(1, 7))
        torch.testing.assert_close(
            torch.tensor([v for _, v in got["train"]]),
            torch.tensor([v for _, v in expected["train"]]),
            rtol=1e-6,
            atol=0,
        )


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_and_prints_the_command_that_continues(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [
        "train",
        str(TINY_RECIPE),
        *SMALL,
        f"output_dir={tmp_path / 'runs'}",
        "tracking.run_name=c",
        "trainer.max_steps=100000",
        "trainer.checkpoint_every_steps=1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nlplatform", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = tmp_path / "runs" / "tiny" / "c" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert last.exists(), "no checkpoint within 120 s"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGINT at step" in err
    command = next(line for line in err.splitlines() if line.startswith("continue with: nlplatform train "))
    assert command.endswith(f"trainer.resume={last}") and "trainer.max_steps=100000" in command
    assert not (last.parent.parent / runs.LOCK).exists()
