"""Both memory suites run from the command line on the families the two suites' own end-to-end tests leave out
(those cover Transformer++ and DeltaNet in detail): Gated DeltaNet, Titans (MAG: sliding-window attention and the
neural memory, two decoding states) and HOPE. Run in process through ``nlplatform.cli.main``: the same parser and
code path as the ``nlplatform`` command, without a new interpreter per run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.eval.conftest import needs_eval_data
from tests.train.conftest import needs_corpus

SMALL = {
    "long_context": [
        "--lengths",
        "128,192",
        "--depths",
        "0.5",
        "--limit",
        "1",
        "--probes",
        "passkey,niah_single_passkey",
    ],
    "continual": [
        "--domains",
        "encyclopedia,howto",
        "--class-tasks",
        "banking,travel",
        "--stage-steps",
        "1",
        "--limit",
        "1",
        "--mode",
        "ttl",
    ],
}
KEYS = {
    "long_context": ["eval/long_context/all/top1_within", "eval/long_context/all/top1_beyond"],
    "continual": [
        "eval/continual/ttl/forgetting",
        "eval/continual/class_il/forgetting",
        "eval/continual/task_il/average",
    ],
}


@needs_corpus
@needs_eval_data
@pytest.mark.parametrize(("family", "recipe"), [("gated_deltanet", "tiny"), ("titans", "tiny_mag"), ("hope", "tiny")])
@pytest.mark.parametrize("suite", ["long_context", "continual"])
def test_memory_suite_runs_on_the_family_and_logs_into_its_run(
    suite, family, recipe, family_run, capsys, monkeypatch, tmp_path
):
    from mlflow.tracking import MlflowClient

    from nlplatform.cli import main

    run_dir, uri, summary = family_run(family, recipe)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(ckpt), "--suite", suite, *SMALL[suite]]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path == ckpt.parent / f"eval-{suite}-last.json"
    report = json.loads(path.read_text())
    assert report["model"] == family
    logged = MlflowClient(uri).get_run(summary["mlflow_run_id"]).data.metrics
    for key in KEYS[suite]:
        assert logged[key] == pytest.approx(report["metrics"][key]), key
