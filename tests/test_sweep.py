"""Sweeps: sweep files are checked before any trial, trials are reproducible recipe overrides tracked as nested MLflow
runs, studies persist and continue, pruning works by optimizer step, failures are recorded, workers share a store."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from nlplatform import cli
from nlplatform.recipe import load_recipe
from nlplatform.sweep import format_value, load_sweep
from tests.train.conftest import FAST, TINY_RECIPE, needs_corpus, run_cli

ROOT = Path(__file__).resolve().parent.parent
# FAST runs of 10 steps, validated every 5: a trial takes seconds
TRIAL = [*FAST, "trainer.max_steps=10", "trainer.val_check_interval=5", "trainer.log_every_n_steps=2"]


def write_sweep(work: Path, name: str = "study", **fields) -> Path:
    """A sweep file in ``work`` on the fast tiny Transformer++, tracked and stored inside ``work``."""
    spec = {
        "recipe": str(TINY_RECIPE),
        "overrides": [*TRIAL, f"output_dir={work / 'runs'}", f"tracking.tracking_uri=sqlite:///{work / 'mlruns.db'}"],
        "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "storage": f"sqlite:///{work / 'sweeps.db'}",
        "n_trials": 3,
        **fields,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def study_of(work: Path, name: str = "study") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{work / 'sweeps.db'}")


def mlflow_runs(work: Path, experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp is not None else []


def sweep_cli(path: Path, *args: str):
    proc = run_cli("sweep", str(path), *args, cwd=path.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------- sweep files (no trials)


def test_seeded_sampler_in_a_new_process_does_not_replay_earlier_trials():
    """Each call (or worker, or machine) builds its sampler from the same seed; reseeding by trial number keeps a
    continued study from proposing the first call's random start-up points again, and the same trial number always
    gets the same point."""
    from nlplatform.sweep.spec import SamplerSpec, build_sampler, seed_for_trial

    def run(study, n):
        def objective(trial):
            seed_for_trial(trial.study.sampler, 0, trial.number)
            return trial.suggest_float("x", 0.0, 1.0)

        study.sampler = build_sampler(SamplerSpec(name="tpe", seed=0))  # a fresh process's sampler
        study.optimize(objective, n_trials=n)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    run(study, 3)
    run(study, 3)
    xs = [t.params["x"] for t in study.trials]
    assert len(set(xs)) == 6
    again = optuna.create_study()
    run(again, 3)
    assert [t.params["x"] for t in again.trials] == xs[:3]


@pytest.mark.slow
def test_every_shipped_sweep_loads_and_its_trials_are_valid_recipes(monkeypatch):
    monkeypatch.chdir(ROOT)  # shipped sweeps name their recipes from the project root, as `make sweep` runs them
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert {"hope_levels.yaml", "hope_levels_tiny.yaml", "titans_memory.yaml", "titans_memory_tiny.yaml"} <= {
        f.name for f in files
    }
    for family in ("transformer", "deltanet", "gated_deltanet", "titans", "hope"):
        assert (ROOT / "sweeps" / f"lr_{family}.yaml").is_file() and (
            ROOT / "sweeps" / f"lr_{family}_tiny.yaml"
        ).is_file()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for path in files:
        sweep = load_sweep(path.relative_to(ROOT))
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for values in sweep.file.enqueue:
            study.enqueue_trial(values)
        for _ in range(len(sweep.file.enqueue) + 5):  # the enqueued trials, then random draws from the space
            trial = study.ask()
            values = {p.key: p.suggest(trial) for p in sweep.params}
            cfg = load_recipe(sweep.file.recipe, sweep.trial_overrides(values, trial.number))
            for key, value in values.items():
                section, name = key.split(".", 1)
                assert getattr(getattr(cfg, section), name) == value, (path.name, key)
            study.tell(trial, 0.0)


def test_ladder_expands_to_base_times_powers_of_ratio(tmp_path):
    path = write_sweep(
        tmp_path,
        recipe=str(ROOT / "recipes/hope/tiny.yaml"),
        space={
            "model.cms_chunk_sizes": {
                "type": "ladder",
                "levels": {"type": "int", "low": 1, "high": 3},
                "base": [32, 64],
                "ratio": 4,
            }
        },
    )
    (param,) = load_sweep(path).params
    trial = optuna.trial.FixedTrial({"model.cms_chunk_sizes.levels": 3, "model.cms_chunk_sizes.base": 32})
    assert param.suggest(trial) == [32, 128, 512]
    assert format_value([32, 128, 512]) == "[32,128,512]"


def test_categorical_lists_round_trip_through_optuna(tmp_path):
    path = write_sweep(
        tmp_path, recipe=str(ROOT / "recipes/hope/tiny.yaml"), space={"model.cms_chunk_sizes": [[64], [64, 2048]]}
    )
    (param,) = load_sweep(path).params
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {tuple(param.suggest(study.ask())) for _ in range(12)}
    assert seen == {(64,), (64, 2048)}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"space": {"optim.lrr": [1e-3, 2e-3]}}, "Did you mean 'optim.lr'?"),
        ({"space": {"model.d_modle": [64]}}, "Did you mean 'model.d_model'?"),
        ({"space": {}}, "search space is empty"),
        ({"sampler": {"name": "tpee"}}, "Did you mean 'tpe'?"),
        ({"pruner": {"name": "medain"}}, "Did you mean 'median'?"),
        ({"pruner": {"name": "median", "options": {"n_startup": 2}}}, "pruner median"),
        ({"objective": {"metric": "val_los"}}, "Did you mean 'val_loss'?"),
        ({"space": {"optim.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}}, "is above high"),
        ({"space": {"optim.lr": {"type": "flaot", "low": 1e-3, "high": 1e-2}}}, "Did you mean 'float'?"),
        ({"n_trial": 3}, "Did you mean 'n_trials'?"),
        ({"enqueue": [{"optim.beta1": 0.8}]}, "does not search"),
    ],
)
def test_bad_sweep_file_exits_2_before_any_trial(tmp_path, capsys, fields, message):
    path = write_sweep(tmp_path, **fields)
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "sweeps.db").exists() and not (tmp_path / "mlruns.db").exists()


def test_unreachable_storage_exits_2_with_the_url(tmp_path, capsys):
    path = write_sweep(tmp_path)
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'sweeps.db'}"
    assert cli.main(["sweep", str(path), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "cannot open the Optuna storage" in err and url in err
    assert not (tmp_path / "mlruns.db").exists()  # nothing tracked for a study that never opened


@pytest.mark.parametrize("where", ["--storage", "file"])
def test_a_storage_password_reaches_no_output(tmp_path, capsys, where):
    """A PostgreSQL URL with a password (given on the command line or in the sweep file) that cannot be opened fails
    with one line and exit 2 that names the URL with its password masked."""
    url = "postgresql://alice:S3cretPW@127.0.0.1:9/optuna"
    path = write_sweep(tmp_path, **({"storage": url} if where == "file" else {}))
    assert cli.main(["sweep", str(path), *(["--storage", url] if where == "--storage" else [])]) == 2
    out, err = capsys.readouterr()
    assert "S3cretPW" not in out + err and "postgresql://alice:***@127.0.0.1:9/optuna" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- real trials


@pytest.fixture(scope="module")
def three_trial_sweep(tmp_path_factory):
    """A 3-trial sweep, then the same sweep again (its budget met) and once more with ``--n-trials 1``: the study
    as it stood after each call."""
    work = tmp_path_factory.mktemp("sweep")
    path = write_sweep(work)
    first = sweep_cli(path)
    after_first = study_of(work).get_trials()
    again = sweep_cli(path)
    more = sweep_cli(path, "--n-trials", "1")
    return work, path, first, after_first, again, more


@pytest.mark.slow
@needs_corpus
def test_three_trial_sweep_completes_with_nested_mlflow_runs(three_trial_sweep):
    work, path, proc, trials_done, _, _ = three_trial_sweep
    assert proc.stdout.strip().splitlines()[-1] == f"study in sqlite:///{work / 'sweeps.db'}"
    assert [t.state for t in trials_done] == [TrialState.COMPLETE] * 3
    runs = mlflow_runs(work, "sweep-study")
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    trials = {r.data.tags["sweep.trial"]: r for r in runs if r.data.tags.get("sweep.role") == "trial"}
    for t in trials_done:
        run = trials[str(t.number)]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert float(run.data.params["optim.lr"]) == pytest.approx(t.params["optim.lr"])
        assert run.data.metrics["summary/val_loss"] == pytest.approx(t.value)  # the objective is the run's figure
        assert t.user_attrs["command"].startswith(f"nlplatform train {TINY_RECIPE}")
    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert path.name in artifacts and {"plots/history.png", "plots/parallel_coordinate.png"} <= plots
    best = min(trials_done, key=lambda t: t.value)
    assert f"best: trial {best.number}" in proc.stdout and best.user_attrs["command"] in proc.stdout


@pytest.mark.slow
@needs_corpus
def test_a_trial_is_reproduced_by_its_printed_command(three_trial_sweep):
    trial = three_trial_sweep[3][0]
    cfg = load_recipe(TINY_RECIPE, trial.user_attrs["overrides"])
    assert cfg.optim.lr == pytest.approx(trial.params["optim.lr"])
    assert cfg.tracking.experiment == "sweep-study" and cfg.tracking.run_name == "study-trial0000"


@needs_corpus
def test_a_second_call_continues_the_study(three_trial_sweep):
    work, _, _, trials_done, again, _ = three_trial_sweep
    assert "3 trial(s) so far, running up to 0 more" in again.stderr  # the budget (3) was met: nothing ran
    study = study_of(work)  # then --n-trials 1 added one trial to the same study, under the same parent run
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert [t.datetime_start for t in study.trials[:3]] == [t.datetime_start for t in trials_done]
    runs = mlflow_runs(work, "sweep-study")
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    trial_runs = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(trial_runs) == 4 and {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parent.info.run_id}
    assert parent.data.metrics["sweep/complete"] == 4 and parent.info.status == "FINISHED"


@pytest.fixture(scope="module")
def mixed_sweep(tmp_path_factory):
    """Three enqueued trials: a good one, one whose recipe is impossible, one that cannot learn in 20 steps."""
    work = tmp_path_factory.mktemp("mixed")
    path = write_sweep(
        work,
        overrides=[
            *TRIAL,
            "trainer.max_steps=20",
            f"output_dir={work / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{work / 'mlruns.db'}",
        ],
        space={"optim.lr": {"type": "float", "low": 1e-7, "high": 1e-2, "log": True}, "model.n_heads": [3, 4]},
        enqueue=[
            {"optim.lr": 1e-2, "model.n_heads": 4},
            {"optim.lr": 1e-2, "model.n_heads": 3},  # d_model 64 is not divisible by 3 heads
            {"optim.lr": 1e-7, "model.n_heads": 4},
        ],
        pruner={"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}},
        n_trials=3,
    )
    return work, sweep_cli(path)


@pytest.mark.slow
@needs_corpus
def test_pruner_stops_a_bad_trial_at_a_validation_step(mixed_sweep):
    work, _ = mixed_sweep
    good, _, bad = study_of(work).trials
    assert good.state == TrialState.COMPLETE and bad.state == TrialState.PRUNED
    assert min(bad.intermediate_values) == 5  # judged at its first validation, by optimizer step
    (run,) = [r for r in mlflow_runs(work, "sweep-study") if r.data.tags.get("sweep.trial") == "2"]
    assert run.data.tags["sweep.state"] == "pruned" and run.info.status == "FINISHED"
    assert run.data.metrics["summary/steps"] < 20


@pytest.mark.slow
@needs_corpus
def test_a_failing_trial_is_recorded_and_the_study_goes_on(mixed_sweep):
    work, proc = mixed_sweep
    _, failed, after = study_of(work).trials
    assert failed.state == TrialState.FAIL and "divisible by model.n_heads" in failed.user_attrs["error"]
    assert after.state != TrialState.FAIL  # the study went on after the failure
    assert "trial 1 failed" in proc.stderr and "1 fail" in proc.stdout


@pytest.mark.slow
@needs_corpus
def test_two_workers_share_one_sqlite_study_without_losing_trials(tmp_path):
    path = write_sweep(tmp_path, n_trials=4)
    sweep_cli(path, "--workers", "2")
    study = study_of(tmp_path)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    trials = [r for r in mlflow_runs(tmp_path, "sweep-study") if r.data.tags.get("sweep.role") == "trial"]
    assert sorted(r.data.tags["sweep.trial"] for r in trials) == ["0", "1", "2", "3"]
    assert os.path.isdir(tmp_path / "runs" / "sweep-study" / "study-trial0003")
