"""A checkpoint is data, never code: every command that reads one (generate, eval with each suite, the lm-eval
adapter, trainer.resume=PATH, model.stack_from) loads it with ``weights_only=True``, so a crafted pickle that would run
a command when unpickled is refused with one line and exit status 2, and the command never runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nlplatform.cli import main
from nlplatform.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class _RunsACommand:
    """Unpickling calls os.system(command): what a hostile checkpoint would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture
def crafted(tmp_path):
    """(a checkpoint that looks like ours but creates ``marker`` when unpickled, the marker's path)."""
    marker = tmp_path / "ran"
    path = tmp_path / "crafted.ckpt"
    recipe = {"model": {"name": "transformer", "preset": "tiny"}}
    torch.save({"hyper_parameters": {"recipe": recipe}, "state_dict": {}, "x": _RunsACommand(f"touch {marker}")}, path)
    return path, marker


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "{ckpt}", "--prompt", "To be", "--max-new-tokens", "2"],
        ["eval", "{ckpt}", "--tasks", "piqa", "--no-track"],
        ["eval", "{ckpt}", "--suite", "long_context", "--no-track"],
        ["eval", "{ckpt}", "--suite", "continual", "--no-track"],
        [
            "train",
            str(ROOT / "recipes/transformer/tiny.yaml"),
            "trainer.resume={ckpt}",
            "tracking.enabled=false",
            "output_dir={out}",
        ],
        [
            "train",
            str(ROOT / "recipes/hope/tiny.yaml"),
            "model.stack_from={ckpt}",
            "tracking.enabled=false",
            "output_dir={out}",
        ],
    ],
    ids=["generate", "eval", "long_context", "continual", "resume", "stack_from"],
)
@pytest.mark.slow
def test_a_crafted_checkpoint_is_refused_before_it_runs_anything(argv, crafted, tmp_path, capsys):
    """In process for the quick commands; training in its own process (its logging handlers outlive a call)."""
    ckpt, marker = crafted
    argv = [a.format(ckpt=ckpt, out=tmp_path / "runs") for a in argv]
    if argv[0] == "train":
        from tests.train.conftest import run_cli

        proc = run_cli(*argv, cwd=tmp_path)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = main(argv), capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "refusing it" in err and "posix.system" in err and "Traceback" not in err
    assert not marker.exists()


def test_the_lm_eval_adapter_refuses_a_crafted_checkpoint(crafted):
    from nlplatform.eval.harness.adapter import NLPlatformLM

    ckpt, marker = crafted
    with pytest.raises(UserError, match="refusing it"):
        NLPlatformLM(pretrained=str(ckpt), device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("family", ["transformer", "hope"])
def test_a_trained_checkpoint_loads_as_data_and_back_into_its_model(family, trained_run, family_run):
    """Our own checkpoints (Lightning's state, the data position, the level scheduler) need nothing beyond tensors
    and plain data: they load whole with weights_only=True, and into their model."""
    from nlplatform.checkpoint import load_checkpoint

    run_dir = trained_run[0] if family == "transformer" else family_run(family)[0]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["recipe"]["model"]["name"] == family and state["optimizer_states"]
    assert load_checkpoint(ckpt).step == state["global_step"] > 0
