"""Experiments shared across machines, on real servers started by the suite (``tests/servers.py``): Optuna studies on
PostgreSQL shared by separate sweep processes, a killed worker's trial failed by its heartbeat and run again, pruning
decided by rank 0 under DDP, and sweeps and runs tracked over HTTP by ``make tracking-server``, with every password
masked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.servers import PG_PASSWORD
from tests.train.conftest import FAST, TINY_RECIPE, needs_corpus, run_cli

pytestmark = needs_corpus

SWEEP_ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def with_password(uri: str) -> str:
    """The tracking server's URI with credentials in it, as a user of a server behind basic auth writes it (this
    server ignores them): every output must show it masked."""
    return uri.replace("http://", f"http://alice:{PG_PASSWORD}@")


def write_sweep(work: Path, tracking_uri: str, name: str, **fields) -> Path:
    """A sweep of the fast tiny Transformer++ (seq_len 64) on ``work``'s runs folder, tracked at ``tracking_uri``."""
    steps = fields.pop("steps", ["trainer.max_steps=3", "trainer.val_check_interval=3"])
    spec = {
        "recipe": str(TINY_RECIPE),
        "overrides": [
            *FAST,
            *steps,
            "trainer.log_every_n_steps=1",
            f"output_dir={work / 'runs'}",
            f"tracking.tracking_uri={tracking_uri}",
        ],
        "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        **fields,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_process(path: Path, storage: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nlplatform", "sweep", str(path), "--storage", storage],
        cwd=path.parent,
        env=SWEEP_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def study_trials(storage: str, name: str) -> list:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def assert_no_password_anywhere(work: Path, outputs: list[str], skip: tuple[Path, ...] = ()) -> int:
    """The password is in no output and no file under ``work`` (binary ones included) but the inputs in ``skip``;
    returns the number of files checked."""
    for text in outputs:
        assert PG_PASSWORD not in text, text[max(0, text.find(PG_PASSWORD) - 300) :][:600]
    files = [p for p in work.rglob("*") if p.is_file() and p not in skip]
    for path in files:
        assert PG_PASSWORD.encode() not in path.read_bytes(), path
    return len(files)


def test_two_machines_share_one_postgresql_study_and_its_budget_exactly(postgres, tracking_server, tmp_path):
    """Two sweep commands started as separate processes, as two machines would, on one study in PostgreSQL: together
    they run exactly the sweep file's 4 trials (a trial asked for once the budget was taken does not run), no trial
    twice, at different points; each trial is a nested MLflow run on the tracking server; and the storage's and the
    tracking server's passwords reach no output, file, checkpoint, MLflow param, tag or uploaded artifact."""
    assert tracking_server.announced == f"export MLFLOW_TRACKING_URI={tracking_server.uri}"  # make tracking-server
    postgres.create_database("two_machines")
    storage = postgres.url("two_machines")
    path = write_sweep(tmp_path, with_password(tracking_server.uri), "shared", n_trials=4)
    created = run_cli("sweep", str(path), "--storage", storage, "--n-trials", "0", cwd=tmp_path)
    assert created.returncode == 0, created.stderr[-3000:]
    machines = [sweep_process(path, storage) for _ in range(2)]
    outputs = [proc.communicate(timeout=900) for proc in machines]
    for proc, (_, err) in zip(machines, outputs):
        assert proc.returncode == 0, err[-3000:]

    trials = study_trials(storage, "shared")
    ran = [t for t in trials if "skipped" not in t.user_attrs]
    assert len(ran) == 4 and all(t.state == TrialState.COMPLETE for t in ran)
    assert len({t.params["optim.lr"] for t in ran}) == 4
    started = [
        {int(line.split()[2].rstrip(":")) for line in err.splitlines() if ": nlplatform train " in line}
        for _, err in outputs
    ]
    # (how the 4 trials split between the machines depends on which started first; on an idle machine, 2 and 2)
    assert started[0].isdisjoint(started[1]) and started[0] | started[1] == {t.number for t in ran}
    folders = sorted(p.name for p in (tmp_path / "runs" / "sweep-shared").glob("shared-trial*"))
    assert folders == sorted(f"shared-trial{t.number:04d}" for t in ran)

    client = MlflowClient(tracking_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-shared").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    nested = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert sorted(int(r.data.tags["sweep.trial"]) for r in nested) == sorted(t.number for t in ran)
    assert {r.data.tags["mlflow.parentRunId"] for r in nested} == {parent.info.run_id}
    assert all(r.info.status == "FINISHED" and "summary/val_loss" in r.data.metrics for r in nested)
    # the sweep ends by writing its experiment's leaderboard into the experiment's page (the last to end: all 4)
    experiment = client.get_experiment_by_name("sweep-shared")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "(4 runs ranked by val ppl)" in experiment.tags["mlflow.note.content"]
    page = "leaderboard of 'sweep-shared' in the MLflow UI: http://alice:***@127.0.0.1:"
    assert all(page in err for _, err in outputs)  # each machine's sweep says where its ranking is

    # secrets: outputs, every file of every run (recipes, run.json, checkpoints), MLflow params and tags, artifacts
    everything = [created.stdout, created.stderr, *(out + err for out, err in outputs)]
    assert "alice:***@" in nested[0].data.params["tracking.tracking_uri"]
    for run in [parent, *nested]:
        everything += [*run.data.params.values(), *run.data.tags.values()]
    downloads = tmp_path / "downloads"
    client.download_artifacts(parent.info.run_id, path.name, str(downloads))
    client.download_artifacts(nested[0].info.run_id, "recipe.yaml", str(downloads / "trial"))
    assert "alice:***@" in (downloads / path.name).read_text()
    checked = assert_no_password_anywhere(tmp_path, everything, skip=(path,))
    assert checked >= 4 * 4  # each run: recipe.yaml, run.json, summary.json, a checkpoint, ...


def test_a_killed_workers_trial_is_failed_by_its_heartbeat_and_run_again(postgres, tmp_path):
    """A sweep process killed with SIGKILL mid-trial leaves its trial running in PostgreSQL. The next sweep command
    (another machine), once the heartbeat's grace period has passed, marks it failed, queues it again with the same
    parameters (Optuna's RetryFailedTrialCallback) and runs it: the study completes its budget."""
    postgres.create_database("heartbeat")
    storage = postgres.url("heartbeat")
    path = write_sweep(
        tmp_path,
        f"sqlite:///{tmp_path / 'mlruns.db'}",
        "killed",
        n_trials=1,
        steps=["trainer.max_steps=150", "trainer.val_check_interval=150"],
        heartbeat={"interval_s": 1, "grace_period_s": 2, "retries": 1},
    )
    worker = sweep_process(path, storage)
    deadline = time.monotonic() + 300
    first = tmp_path / "runs" / "sweep-killed" / "killed-trial0000" / "checkpoints"
    while not (first.parent / "recipe.yaml").exists():  # the trial is training
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()[1][-3000:]
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.communicate(timeout=60)
    (lost,) = study_trials(storage, "killed")
    assert lost.state == TrialState.RUNNING  # nobody told the storage
    time.sleep(3)  # past the grace period: the trial's heartbeat is stale

    again = run_cli("sweep", str(path), "--storage", storage, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    failed, retry = study_trials(storage, "killed")
    assert failed.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == failed.params
    assert "worker lost (no heartbeat); retried as #1" in again.stdout and "retry of #0" in again.stdout
    assert (tmp_path / "runs" / "sweep-killed" / "killed-trial0001" / "summary.json").exists()
    assert not list(first.glob("*.ckpt"))  # the killed trial's folder is its own, untouched by the retry


def test_pruning_under_ddp_is_decided_by_rank_0_and_stops_every_rank(postgres, tracking_server, tmp_path):
    """A sweep trial on 2 CPU processes (Lightning's launcher restarts the sweep command for rank 1, which trains the
    trial's recipe instead of asking the study for a trial): rank 0 reports and asks the pruner, every rank stops at
    the step it decided, and the trial is pruned there with one report, logged over HTTP."""
    postgres.create_database("ddp_pruning")
    storage = postgres.url("ddp_pruning")
    ddp = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "optim.warmup_steps=2"]
    path = write_sweep(
        tmp_path,
        tracking_server.uri,
        "ddp",
        steps=["trainer.max_steps=8", "trainer.val_check_interval=4", *ddp],
        enqueue=[{"optim.lr": 2e-2}, {"optim.lr": 1e-7}],
        n_trials=2,
        space={"optim.lr": {"type": "float", "low": 1e-7, "high": 2e-2, "log": True}},
        pruner={"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}},
    )
    proc = run_cli("sweep", str(path), "--storage", storage, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    good, bad = study_trials(storage, "ddp")
    assert good.state == TrialState.COMPLETE and bad.state == TrialState.PRUNED, (bad.user_attrs, proc.stderr[-3000:])
    assert list(bad.intermediate_values) == [4]  # one report (rank 0's), at the step the run stopped
    import json

    summary = json.loads((tmp_path / "runs" / "sweep-ddp" / "ddp-trial0001" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2
    run = MlflowClient(tracking_server.uri).get_run(summary["mlflow_run_id"])
    assert run.data.tags["sweep.state"] == "pruned" and run.data.tags["world_size"] == "2"


def test_a_sweep_started_under_torchrun_is_refused_with_what_to_do(tmp_path, capsys):
    """Each rank of a sweep command launched by torchrun would ask the study for trials of its own: refused (exit 2)
    with the way to train a trial on several devices."""
    from nlplatform import cli

    path = write_sweep(tmp_path, "sqlite:///unused.db", "torchrun")
    os.environ.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    try:
        assert cli.main(["sweep", str(path)]) == 2
    finally:
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            os.environ.pop(key)
    assert "trainer.devices=N" in capsys.readouterr().err


@pytest.mark.slow
def test_training_survives_its_tracking_server_stopping_mid_run(tmp_path):
    """The tracking server of a run stops once the run has checkpointed step 10 of 60: the run still ends on time with
    exit 0, every checkpoint and its summary, and one warning saying what did not reach MLflow."""
    from tests.servers import start_tracking_server

    server = start_tracking_server(
        f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", tmp_path / "server.log"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nlplatform",
            "train",
            str(TINY_RECIPE),
            *FAST,
            "trainer.max_steps=60",
            "trainer.val_check_interval=10",
            "trainer.log_every_n_steps=1",
            "trainer.save_top_k=-1",
            f"output_dir={tmp_path / 'runs'}",
            f"tracking.tracking_uri={server.uri}",
            "tracking.experiment=orphans",
            "tracking.run_name=orphan",
            "tracking.system_metrics_every_s=1",
        ],
        cwd=tmp_path,
        env=SWEEP_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = tmp_path / "runs" / "orphans" / "orphan"
    deadline = time.monotonic() + 300
    while not list((run_dir / "checkpoints").glob("step00001*.ckpt")):  # past step 10: the server is in use
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    server.stop()
    stopped = time.monotonic()
    out, err = proc.communicate(timeout=600)
    after = time.monotonic() - stopped
    assert proc.returncode == 0, err[-3000:]
    assert Path(out.strip().splitlines()[-1]) == run_dir
    steps = sorted(p.name[:10] for p in (run_dir / "checkpoints").glob("step*.ckpt"))
    assert steps == [f"step{n:06d}" for n in range(10, 61, 10)]
    assert (run_dir / "summary.json").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    warning = [line for line in err.splitlines() if line.startswith("warning: MLflow calls to")]
    assert len(warning) == 1 and "the run folder holds the whole run" in warning[0], err[-3000:]
    assert "Traceback" not in err
    # A hang detector, not a speed test: with MLflow's default retries each of the calls queued after the stop would
    # stall for minutes (16 s in all on an idle 2-core machine, training included).
    assert after < 300, f"the run took {after:.0f} s after its server stopped"


@pytest.mark.slow
def test_a_lost_tracking_server_costs_a_sweep_a_warning_not_its_trial(capsys):
    """Tagging a finished trial's run on a tracking server that is gone prints one masked warning and returns: the
    trial stays complete (the study and the run folder hold it)."""
    from nlplatform.sweep.study import _Context, _tag_run
    from tests.servers import free_port

    gone = f"http://alice:{PG_PASSWORD}@127.0.0.1:{free_port()}"
    _tag_run(
        _Context("unused.yaml", "sqlite://", None, gone, progress_bar=False), "0123abc", {"sweep.state": "complete"}
    )
    err = capsys.readouterr().err
    assert err.startswith("warning: the tags of run 0123abc not logged to MLflow:") and err.count("\n") == 1
    assert PG_PASSWORD not in err


def test_a_sweep_whose_tracking_server_is_unreachable_exits_2_before_any_trial(postgres, tmp_path, capsys):
    from nlplatform import cli
    from tests.servers import free_port

    postgres.create_database("unreachable_tracking")
    path = write_sweep(tmp_path, f"http://alice:{PG_PASSWORD}@127.0.0.1:{free_port()}", "unreachable")
    assert cli.main(["sweep", str(path), "--storage", postgres.url("unreachable_tracking")]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the MLflow store http://alice:***@" in err and PG_PASSWORD not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_training_whose_tracking_server_is_unreachable_exits_2_with_nothing_written(tmp_path):
    from tests.servers import free_port

    gone = f"http://alice:{PG_PASSWORD}@127.0.0.1:{free_port()}"
    proc = run_cli(
        "train",
        str(TINY_RECIPE),
        *FAST,
        "trainer.max_steps=2",
        f"output_dir={tmp_path / 'runs'}",
        f"tracking.tracking_uri={gone}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if "cannot reach the MLflow store" in line]
    assert "http://alice:***@" in line and "Traceback" not in proc.stderr and PG_PASSWORD not in proc.stderr
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
