"""`nlplatform eval CHECKPOINT --suite NAME [flags]`: every suite parses its own flags and only those. The suites'
work is replaced by stand-ins that record what they were asked, so these run in milliseconds and need no checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nlplatform.cli import main
from nlplatform.eval.report import SuiteResult

ROOT = Path(__file__).resolve().parents[2]
FLAGS = {
    "smoke": {"--tasks", "--limit", "--batch-size", "--dtype", "--device", "--no-track"},
    "long_context": {"--probes", "--lengths", "--depths", "--limit", "--seed", "--device", "--no-track"},
    "continual": {
        "--protocol",
        "--domains",
        "--class-tasks",
        "--stage-steps",
        "--mode",
        "--limit",
        "--seed",
        "--device",
        "--no-track",
    },
}
EVERY_FLAG = set.union(*FLAGS.values())


def exit_status(argv: list[str]) -> int:
    """``nlplatform.cli.main``'s exit status: returned, or raised by argparse."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture
def recorded(monkeypatch, tmp_path) -> dict:
    """Each suite's evaluate function replaced by one that records its arguments and returns a result."""
    from nlplatform.eval.continual import suite as continual
    from nlplatform.eval.harness import suite as harness
    from nlplatform.eval.long_context import suite as long_context

    calls: dict = {}
    path = tmp_path / "eval.json"

    def harness_evaluate(checkpoint, suite, **kwargs):
        calls["harness"] = {"checkpoint": checkpoint, "suite": suite.name, **kwargs}
        return harness.EvalResult(path=path, metrics={}, row=harness.paper_row({}))

    def long_context_evaluate(checkpoint, **kwargs):
        calls["long_context"] = {"checkpoint": checkpoint, **kwargs}
        return SuiteResult(path=path, metrics={})

    def continual_evaluate(checkpoint, settings, **kwargs):
        calls["continual"] = {"checkpoint": checkpoint, "settings": settings, **kwargs}
        return SuiteResult(path=path, metrics={})

    monkeypatch.setattr(harness, "evaluate", harness_evaluate)
    monkeypatch.setattr(long_context, "evaluate_long_context", long_context_evaluate)
    monkeypatch.setattr(continual, "evaluate_continual", continual_evaluate)
    return calls


def test_the_old_form_still_routes_each_suite_to_its_evaluation(recorded, capsys, tmp_path):
    """`eval CKPT --suite X` (what `make eval` and `nlplatform compare` run) reaches suite X; no --suite is the
    commonsense suite; the suite's flags arrive parsed, wherever --suite stands."""
    assert main(["eval", "a.ckpt"]) == 0
    assert recorded["harness"]["suite"] == "commonsense" and recorded["harness"]["checkpoint"] == "a.ckpt"

    assert (
        main(
            [
                "eval",
                "a.ckpt",
                "--suite",
                "smoke",
                "--tasks",
                "piqa,boolq",
                "--limit",
                "2",
                "--batch-size",
                "4",
                "--dtype",
                "bfloat16",
                "--no-track",
            ]
        )
        == 0
    )
    call = recorded["harness"]
    assert call["suite"] == "smoke" and call["tasks"] == ["piqa", "boolq"] and call["limit"] == 2
    assert call["batch_size"] == 4 and call["dtype"] == "bfloat16" and call["track"] is False

    assert (
        main(
            [
                "eval",
                "--suite",
                "long_context",
                "--probes",
                "passkey",
                "b.ckpt",
                "--lengths",
                "128,256",
                "--depths",
                "0,0.5",
                "--limit",
                "1",
            ]
        )
        == 0
    )
    call = recorded["long_context"]
    assert call["checkpoint"] == "b.ckpt" and call["tasks"] == ["passkey"] and call["lengths"] == [128, 256]
    assert call["depths"] == [0.0, 0.5] and call["limit"] == 1 and call["track"] is True

    assert (
        main(
            [
                "eval",
                "c.ckpt",
                "--suite=continual",
                "--mode",
                "ttl",
                "--protocol",
                "domains",
                "--domains",
                "howto,fiction",
                "--limit",
                "3",
                "--stage-steps",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    call = recorded["continual"]
    settings = call["settings"]
    assert call["checkpoint"] == "c.ckpt" and call["device"] == "cpu"
    assert settings.modes == ("ttl",) and settings.protocols == ("domains",)
    assert settings.domains == ("howto", "fiction") and settings.stage_steps == 2
    assert settings.eval_windows == settings.test_per_label == 3
    assert capsys.readouterr().out.strip().splitlines()[-1] == str((tmp_path / "eval.json").resolve())


@pytest.mark.parametrize(
    ("suite", "words", "refused"),
    [
        ("long_context", ["--dtype", "bfloat16"], "--dtype"),
        ("long_context", ["--batch-size", "4"], "--batch-size"),
        ("long_context", ["--tasks", "passkey"], "--tasks"),
        ("continual", ["--dtype=bfloat16"], "--dtype"),
        ("continual", ["--batch-size", "4"], "--batch-size"),
        ("continual", ["--tasks", "piqa"], "--tasks"),
        ("continual", ["--lengths", "128"], "--lengths"),
        ("smoke", ["--probes", "passkey"], "--probes"),
        ("smoke", ["--mode", "ttl"], "--mode"),
        ("commonsense", ["--depths", "0.5"], "--depths"),
    ],
)
def test_a_suite_refuses_a_flag_it_does_not_use_in_one_line_naming_its_flags(suite, words, refused, recorded, capsys):
    """Exit status 2 before any work, and one line: the suite, the refused flag and the flags the suite takes."""
    assert exit_status(["eval", "a.ckpt", "--suite", suite, *words]) == 2
    assert not recorded
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"--suite {suite} takes no {refused}" in err
    named = {flag.strip(" ,()") for flag in err.split("its flags:")[1].split()}
    assert FLAGS.get(suite, FLAGS["smoke"]) <= named and not (EVERY_FLAG - FLAGS.get(suite, FLAGS["smoke"])) & named


def test_the_probe_tasks_flag_of_long_context_is_probes_and_tasks_says_so(capsys):
    assert exit_status(["eval", "a.ckpt", "--suite", "long_context", "--tasks", "passkey"]) == 2
    assert "the probe tasks are --probes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("words", "fragment"),
    [
        (["a.ckpt", "--suite", "long_contxt"], "unknown suite 'long_contxt'. Did you mean 'long_context'?"),
        (["a.ckpt", "--suite"], "argument --suite: expected one argument"),
        (["--suite", "continual"], "the following arguments are required: CHECKPOINT"),
        (["a.ckpt", "--suite", "long_context", "--lengths", "128,abc"], "expected comma-separated numbers"),
        (["a.ckpt", "--suite", "continual", "--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
        (["a.ckpt", "b.ckpt", "--suite", "smoke"], "unexpected argument(s) 'b.ckpt'"),
    ],
    ids=["unknown-suite", "no-suite-name", "no-checkpoint", "bad-number", "bad-choice", "two-checkpoints"],
)
def test_a_malformed_eval_command_is_one_line_with_exit_2(words, fragment, recorded, capsys):
    assert exit_status(["eval", *words]) == 2
    assert not recorded
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize("suite", ["smoke", "long_context", "continual"])
def test_help_of_a_suite_lists_its_flags_and_no_other(suite, capsys):
    """`nlplatform eval CKPT --suite X --help` (and `nlplatform eval --help`, the default suite's) shows X's flags."""
    argv = ["eval", "--help"] if suite == "smoke" else ["eval", "a.ckpt", "--suite", suite, "--help"]
    assert exit_status(argv) == 0
    out = capsys.readouterr().out
    shown = {word.strip("[],") for word in out.split() if word.startswith(("--", "[--"))}
    assert FLAGS[suite] <= shown and not (EVERY_FLAG - FLAGS[suite]) & shown, shown
    if suite == "smoke":
        assert "--suite long_context --help" in " ".join(out.split())  # where the other suites' flags are


def test_the_nlplatform_command_refuses_a_foreign_flag_with_exit_2_and_no_usage_block():
    """The real command line, end to end: status 2 and a single line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "nlplatform", "eval", "a.ckpt", "--suite", "long_context", "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "takes no --dtype" in proc.stderr
