"""`nlplatform leaderboard` (runs ranked from the MLflow store) and the `nlplatform compare` driver.

Most tests read a small store written with the MLflow client (runs of two families, eval metrics on one, an
unfinished run, a sweep parent and its trial); one reads a copy of the session's real training run. The compare
driver is tested with its child processes replaced: training every family is `make compare`'s job, not the suite's.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from nlplatform import compare as compare_mod
from nlplatform.cli import main
from nlplatform.leaderboard import LEADERBOARD_EXPERIMENT, Leaderboard, build_leaderboard

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _add_run(
    client,
    experiment: str,
    name: str,
    metrics: dict[str, float],
    *,
    family: str = "transformer",
    status: str = "FINISHED",
    tags: dict[str, str] | None = None,
) -> str:
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=name, tags={"family": family, "preset": "tiny", **(tags or {})})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _summary(val_ppl: float, tokens_per_sec: float) -> dict[str, float]:
    return {
        "summary/val_ppl": val_ppl,
        "summary/tokens_per_sec": tokens_per_sec,
        "summary/params": 1000.0,
        "summary/tokens_seen": 4096.0,
        "summary/wall_s": 12.0,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(uri, work folder, {run name: run id}): experiment `alpha` with two finished runs of two families (one with
    eval metrics), a running and a failed run; experiment `sweep` with a study parent and one finished trial. The
    work folder is the current directory while the store is written and read, so MLflow's artifacts land there."""
    work = tmp_path_factory.mktemp("leaderboard-store")
    uri = f"sqlite:///{work / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        client = _client(uri)
        ids = {
            "slow-good": _add_run(
                client,
                "alpha",
                "slow-good",
                {
                    **_summary(3.0, 100.0),
                    "eval/piqa/acc": 0.6,
                    "eval/piqa/acc_norm": 0.55,
                    "eval/piqa/acc_stderr": 0.05,
                },
                family="hope",
            ),
            "fast-bad": _add_run(client, "alpha", "fast-bad", _summary(9.0, 5000.0)),
            "unfinished": _add_run(client, "alpha", "unfinished", _summary(1.0, 1.0), status="RUNNING"),
            "crashed": _add_run(client, "alpha", "crashed", _summary(1.5, 1.0), status="FAILED"),
        }
        parent = _add_run(client, "sweep", "study", {"summary/val_ppl": 0.5}, tags={"sweep.role": "study"})
        ids["study"] = parent
        ids["trial-0"] = _add_run(
            client,
            "sweep",
            "trial-0",
            _summary(4.0, 800.0),
            family="deltanet",
            tags={"sweep.role": "trial", "mlflow.parentRunId": parent},
        )
    return uri, work, ids


@pytest.fixture
def in_store_dir(store, monkeypatch):
    uri, work, ids = store
    monkeypatch.chdir(work)
    return uri, work, ids


# ------------------------------------------------------------------------------------------------ ranking


@pytest.mark.slow
def test_finished_runs_are_ranked_by_val_ppl_ascending(in_store_dir, tmp_path):
    """Rows are the finished model runs of every experiment, best validation perplexity first."""
    uri, _, _ = in_store_dir
    board = build_leaderboard(out=tmp_path / "lb", tracking_uri=uri)
    assert [r["run"] for r in board.rows] == ["slow-good", "trial-0", "fast-bad"]
    assert [r["val_ppl"] for r in board.rows] == [3.0, 4.0, 9.0]
    assert board.experiments == ["alpha", "sweep"]


def test_unfinished_and_failed_runs_are_left_out(in_store_dir, tmp_path):
    """A running or failed run has no final figures and is not ranked, however low its logged perplexity."""
    uri, _, ids = in_store_dir
    board = build_leaderboard(["alpha"], out=tmp_path / "lb", tracking_uri=uri)
    run_ids = {r["run_id"] for r in board.rows}
    assert ids["unfinished"] not in run_ids and ids["crashed"] not in run_ids
    assert {r["run"] for r in board.rows} == {"slow-good", "fast-bad"}


def test_study_parent_runs_are_left_out_but_their_trials_are_ranked(in_store_dir, tmp_path):
    """A sweep's parent run (sweep.role=study) is not a model; its trials are ranked like any run."""
    uri, _, ids = in_store_dir
    board = build_leaderboard(["sweep"], out=tmp_path / "lb", tracking_uri=uri)
    assert [r["run_id"] for r in board.rows] == [ids["trial-0"]]
    assert board.rows[0]["family"] == "deltanet"


def test_eval_metrics_are_columns_blank_where_a_run_lacks_them(in_store_dir, tmp_path):
    """Every eval/<task>/<metric> of any run is a CSV column (between val ppl and tokens/s), empty for the other
    runs; the markdown table shows the scores, not lm-eval's standard errors."""
    uri, _, _ = in_store_dir
    board = build_leaderboard(out=tmp_path / "lb", tracking_uri=uri)
    assert board.columns == [
        "run",
        "family",
        "preset",
        "params",
        "tokens_seen",
        "val_ppl",
        "eval/piqa/acc",
        "eval/piqa/acc_norm",
        "eval/piqa/acc_stderr",
        "tokens_per_sec",
        "wall_s",
        "experiment",
        "run_id",
    ]
    with board.csv.open(newline="") as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert float(table["slow-good"]["eval/piqa/acc"]) == 0.6
    assert table["fast-bad"]["eval/piqa/acc"] == "" and table["trial-0"]["eval/piqa/acc_norm"] == ""
    assert float(table["slow-good"]["eval/piqa/acc_stderr"]) == 0.05  # the CSV keeps every eval metric
    header = board.markdown.read_text().splitlines()[0]  # the printed table only the scores
    assert "| val ppl | piqa | piqa acc_n | tokens/s |" in header


def test_the_markdown_table_is_compact_with_ids_in_the_csv_only(in_store_dir, tmp_path):
    """The table fits a preview pane: counts as 4.2M / 307K, wall time in minutes, no run ids (the CSV has them), and
    the experiment column only when the runs come from more than one experiment; the chart is drawn 800 px wide."""
    from nlplatform.leaderboard import compact

    assert [compact(v) for v in (737, 3929.4, 12_345, 307_200, 4_209_716, 1.3e9, 0.5)] == [
        "737",
        "3.9K",
        "12.3K",
        "307K",
        "4.2M",
        "1.3B",
        "0.5",
    ]
    uri, _, ids = in_store_dir
    board = build_leaderboard(["alpha"], out=tmp_path / "one", tracking_uri=uri)
    text = board.markdown.read_text()
    assert "| 1 | slow-good | hope | tiny | 1K | 4.1K | 3.000 |" in text and "| 0.2 |" in text  # 12 s
    assert ids["slow-good"] not in text and "experiment" not in text.splitlines()[0]
    with board.csv.open(newline="") as f:
        assert {row["run_id"] for row in csv.DictReader(f)} == {ids["slow-good"], ids["fast-bad"]}
    both = build_leaderboard(["alpha", "sweep"], out=tmp_path / "two", tracking_uri=uri)
    assert "| experiment |" in both.markdown.read_text().splitlines()[0]
    png = board.chart.read_bytes()  # drawn at the preview pane's width, so its text is not scaled down there
    assert png.startswith(PNG_MAGIC) and int.from_bytes(png[16:20], "big") == 800


def test_each_ranked_experiment_describes_its_own_ranking_and_keeps_what_a_user_wrote(in_store_dir, tmp_path):
    """The experiment's description (the top of its page in the MLflow UI) shows its own runs best first, each linked
    to its page, with the leaderboard run's files linked; rebuilding replaces that section only, so a user's own text
    stays, once."""
    from nlplatform.leaderboard import NOTE_END, NOTE_START, NOTE_TAG

    uri, _, ids = in_store_dir
    client = _client(uri)
    alpha = client.get_experiment_by_name("alpha").experiment_id
    client.set_experiment_tag(alpha, NOTE_TAG, "Hand-written: why these two runs.")
    build_leaderboard(out=tmp_path / "one", tracking_uri=uri)
    board = build_leaderboard(out=tmp_path / "two", tracking_uri=uri)
    assert board.experiment_ids == {"alpha": alpha, "sweep": client.get_experiment_by_name("sweep").experiment_id}
    note = client.get_experiment(alpha).tags[NOTE_TAG]
    assert note.count(NOTE_START) == 1 and note.count("Hand-written: why these two runs.") == 1
    assert note.startswith(NOTE_START) and note.index(NOTE_END) < note.index("Hand-written")
    lines = note.splitlines()
    assert lines[1] == "#### Leaderboard: slow-good first, val ppl 3.000 (2 runs ranked by val ppl)"
    rows = [
        [cell.strip().removesuffix("&emsp;") for cell in line.strip("|").split("|")]
        for line in lines
        if line.startswith(("| 1", "| 2"))
    ]
    assert rows[0][:4] == ["1", f"[slow-good](#/experiments/{alpha}/runs/{ids['slow-good']})", "hope", "1K"]
    assert rows[1][:3] == ["2", f"[fast-bad](#/experiments/{alpha}/runs/{ids['fast-bad']})", "transformer"]
    board_experiment = client.get_run(board.run_id).info.experiment_id
    assert f"(#/experiments/{board_experiment}/runs/{board.run_id}/artifacts)" in note
    sweep_note = client.get_experiment(board.experiment_ids["sweep"]).tags[NOTE_TAG]
    assert "trial-0 first" in sweep_note and "| study" not in sweep_note  # the study's parent run is not ranked


def test_experiments_the_platform_creates_open_in_the_model_training_layout(tmp_path):
    """The leaderboard's own experiment (like training's and sweeps', through ``tracking.experiment_id``) carries
    MLflow's model-training kind; an existing experiment is found, not recreated."""
    from nlplatform.tracking import EXPERIMENT_KIND, experiment_id

    client = _client(f"sqlite:///{tmp_path / 'mlruns.db'}")
    first = experiment_id(client, "fresh")
    assert experiment_id(client, "fresh") == first
    assert client.get_experiment(first).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1] == "custom_model_development"


def test_leaderboard_runs_are_logged_with_the_files_and_never_ranked(in_store_dir, tmp_path):
    """Each leaderboard is a run in the `leaderboard` experiment with its three files and its row count; a later
    leaderboard does not rank those runs."""
    uri, _, _ = in_store_dir
    first = build_leaderboard(out=tmp_path / "one", tracking_uri=uri)
    second = build_leaderboard(out=tmp_path / "two", tracking_uri=uri)
    assert len(second.rows) == len(first.rows) == 3
    assert LEADERBOARD_EXPERIMENT not in second.experiments

    client = _client(uri)
    run = client.get_run(second.run_id)
    assert client.get_experiment(run.info.experiment_id).name == LEADERBOARD_EXPERIMENT
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("leaderboard-")
    assert run.data.metrics["leaderboard/runs"] == 3
    assert run.data.tags["leaderboard.experiments"] == "alpha,sweep"
    names = {Path(a.path).name for a in client.list_artifacts(second.run_id)}
    assert names == {"leaderboard.md", "leaderboard.csv", "leaderboard.png"}
    assert second.long_context_chart is None  # no run has long-context scores


def test_a_trained_run_is_ranked_with_its_summary_and_eval_figures(trained_run, trained_summary, tmp_path, monkeypatch):
    """A real training run, read over HTTP from the tracking server it logged to (with an eval metric of this test's
    own added), gives a row with its summary figures and the eval column, and all three files are written."""
    _, uri, _ = trained_run
    assert uri.startswith("http://")
    monkeypatch.chdir(tmp_path)
    _client(uri).log_metric(trained_summary["mlflow_run_id"], "eval/leaderboard_probe/acc", 0.5)

    board = build_leaderboard(["tests"], out=tmp_path / "lb", tracking_uri=uri)
    (row,) = board.rows
    assert row["run_id"] == trained_summary["mlflow_run_id"]
    assert (row["family"], row["preset"], row["experiment"]) == ("transformer", "tiny", "tests")
    assert row["params"] == trained_summary["params"] and row["tokens_seen"] == trained_summary["tokens_seen"]
    assert row["val_ppl"] == pytest.approx(trained_summary["val_ppl"], rel=1e-5)
    assert row["tokens_per_sec"] > 0 and row["wall_s"] > 0 and row["eval/leaderboard_probe/acc"] == 0.5
    assert board.chart.read_bytes().startswith(PNG_MAGIC)
    assert row["run"] in board.markdown.read_text()


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_prints_the_table_and_the_output_folder_as_its_last_line(in_store_dir, tmp_path, capsys):
    """`nlplatform leaderboard` prints the markdown table, then the absolute output folder as the last line."""
    uri, _, _ = in_store_dir
    out = tmp_path / "board"
    assert main(["leaderboard", "--tracking-uri", uri, "--experiment", "alpha", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out.resolve())
    assert lines[0].startswith("| # | run |") and "slow-good" in lines[2] and "fast-bad" in lines[3]
    assert sorted(p.name for p in out.iterdir()) == ["leaderboard.csv", "leaderboard.md", "leaderboard.png"]


def test_unknown_experiment_exits_2_with_did_you_mean_and_writes_nothing(in_store_dir, tmp_path, capsys):
    """A misspelt experiment is a one-line error with a suggestion, exit status 2, and no output folder."""
    uri, _, _ = in_store_dir
    out = tmp_path / "board"
    assert main(["leaderboard", "--tracking-uri", uri, "--experiment", "alpah", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "experiment 'alpah' not found" in err and "Did you mean 'alpha'?" in err
    assert not out.exists()


@pytest.mark.slow
def test_store_without_finished_runs_exits_2_naming_the_experiments_searched(tmp_path, monkeypatch, capsys):
    """With nothing finished to rank, the error names the experiments searched and how to produce runs."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    _add_run(_client(uri), "empty", "still-going", _summary(2.0, 10.0), status="RUNNING")
    out = tmp_path / "board"
    assert main(["leaderboard", "--tracking-uri", uri, "--out", str(out)]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "no finished runs" in err and "empty" in err and "make compare" in err
    assert not out.exists()


def test_missing_store_exits_2_without_creating_it(tmp_path, capsys):
    """A sqlite store that does not exist is reported, not silently created empty."""
    db = tmp_path / "nowhere.db"
    assert main(["leaderboard", "--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "board")]) == 2
    assert "no tracking store" in capsys.readouterr().err
    assert not db.exists()


# --------------------------------------------------------------------------------------- the compare driver


@pytest.fixture
def fake_compare(tmp_path, monkeypatch):
    """The compare driver with its child processes replaced: returns the list of commands it ran. A train command
    makes an empty run folder and prints it (the CLI contract); families in `fail_train` / `fail_eval` fail."""
    calls: list[list[str]] = []
    fail_train: set[str] = set()
    fail_eval: set[str] = set()

    def run_cli(args, env=None):
        calls.append(list(args))
        if args[0] == "train":
            name = next(a.split("=", 1)[1] for a in args if a.startswith("tracking.run_name="))
            if any(name.startswith(f + "-") for f in fail_train):
                return 1, "Traceback ..."
            run_dir = tmp_path / "runs" / name
            run_dir.mkdir(parents=True)
            return 0, str(run_dir)
        return (1, None) if any(f"/{f}-" in args[1] for f in fail_eval) else (0, "results.json")

    board_dir = tmp_path / "board"
    board_dir.mkdir()
    (board_dir / "leaderboard.md").write_text("| # | run |\n")
    board = Leaderboard(
        [], [], ["compare"], board_dir, board_dir / "leaderboard.md", board_dir / "x.csv", board_dir / "x.png", "run-id"
    )
    monkeypatch.setattr(compare_mod, "_run_cli", run_cli)
    monkeypatch.setattr(compare_mod, "_eval_data_ready", lambda: True)
    monkeypatch.setattr(compare_mod, "build_leaderboard", lambda experiments, tracking_uri=None: board)
    return calls, fail_train, fail_eval


def test_compare_trains_every_family_on_the_same_budget(fake_compare):
    """Every family's tiny recipe gets the same sequence length, batch, steps and experiment (named after the
    budget), and its own run name."""
    calls, _, _ = fake_compare
    result = compare_mod.compare(steps=12, batch_size=4, seq_len=64, suite="smoke")
    trains = [c for c in calls if c[0] == "train"]
    assert [Path(c[1]).parent.name for c in trains] == [
        "transformer",
        "deltanet",
        "gated_deltanet",
        "titans",
        "hope",
        "hope",
    ]
    budget = ["data.seq_len=64", "data.batch_size=4", "trainer.max_steps=12", "tracking.experiment=compare-12x4x64"]
    for call in trains:
        assert all(b in call for b in budget), call
    run_names = {a for c in trains for a in c if a.startswith("tracking.run_name=")}
    assert len(run_names) == 6
    evals = [c for c in calls if c[0] == "eval"]
    assert len(evals) == 6 and all(c[1].endswith("checkpoints/last.ckpt") and "smoke" in c for c in evals)
    assert not result.failures and len(result.run_dirs) == 6


def test_compare_keeps_going_after_a_failure_and_exits_nonzero_naming_it(fake_compare, capsys):
    """A family that fails to train or to evaluate does not stop the others; the failures are listed at the end,
    the exit status is 1 and the leaderboard folder is still the last line."""
    calls, fail_train, fail_eval = fake_compare
    fail_train.add("deltanet")
    fail_eval.add("titans")
    assert main(["compare", "--steps", "3"]) == 1
    captured = capsys.readouterr()
    assert len([c for c in calls if c[0] == "train"]) == 6
    assert len([c for c in calls if c[0] == "eval"]) == 5  # every family that trained, deltanet excepted
    failed = [line for line in captured.err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and "deltanet: training failed" in failed[0] and "titans: evaluation failed" in failed[1]
    assert "[2/6] deltanet: training" in captured.out
    assert captured.out.strip().splitlines()[-1].endswith("board")


def test_compare_skips_evaluation_without_eval_data(fake_compare, monkeypatch, capsys):
    """Without the eval data, compare trains and ranks, says evaluation was skipped, and does not fail for it."""
    calls, _, _ = fake_compare
    monkeypatch.setattr(compare_mod, "_eval_data_ready", lambda: False)
    result = compare_mod.compare(steps=3, families=["transformer", "hope"])
    assert [c[0] for c in calls] == ["train", "train"] and not result.failures
    assert "make eval-data" in capsys.readouterr().out


def test_compare_rejects_an_unknown_family_with_did_you_mean(fake_compare, capsys):
    """A misspelt family fails before anything trains, with a suggestion and exit status 2."""
    calls, _, _ = fake_compare
    assert main(["compare", "--families", "transformer,deltanett"]) == 2
    assert "Did you mean 'deltanet'?" in capsys.readouterr().err and not calls


def test_compare_optimizers_trains_each_family_once_per_optimizer_at_its_default_rate(fake_compare):
    """--optimizers crosses the families with the optimizers: <family>+<optimizer> runs in one experiment named after
    the budget; each names only its optimizer, whose default rate the recipe loader then gives it (AdamW keeps the
    recipe's own settings)."""
    calls, _, _ = fake_compare
    result = compare_mod.compare(
        steps=12,
        batch_size=4,
        seq_len=64,
        suite=None,
        families=["transformer", "hope"],
        optimizers=["adamw", "m3", "dmgd"],
    )
    trains = [c for c in calls if c[0] == "train"]
    assert list(result.run_dirs) == [f"{f}+{o}" for f in ("transformer", "hope") for o in ("adamw", "m3", "dmgd")]
    assert all("tracking.experiment=compare-optimizers-12x4x64" in c for c in trains)
    assert not any(a.startswith("optim.") for a in trains[0])
    assert [a for a in trains[1] if a.startswith("optim.")] == ["optim.name=m3"]
    assert [a for a in trains[5] if a.startswith("optim.")] == ["optim.name=dmgd"]


def test_compare_rejects_an_unknown_optimizer_with_did_you_mean(fake_compare, capsys):
    calls, _, _ = fake_compare
    assert main(["compare", "--optimizers", "adamw,m33"]) == 2
    assert "Did you mean 'm3'?" in capsys.readouterr().err and not calls


def test_the_printed_table_keeps_the_pooled_long_context_and_the_main_continual_scores():
    """The long-context suite logs a metric per task and length; the table shows exact / top-1 / MRR within and
    beyond the trained length. The continual suite's table columns are average and forgetting per mode or setting.
    The CSV keeps everything."""
    from nlplatform.leaderboard import is_score

    assert is_score("eval/long_context/all/exact_within") and is_score("eval/long_context/all/top1_beyond")
    assert not is_score("eval/long_context/passkey/exact_len512") and not is_score("eval/long_context/all/top1_len512")
    assert not is_score("eval/long_context/loss_within")
    assert is_score("eval/piqa/acc") and not is_score("eval/piqa/acc_stderr")
    assert is_score("eval/continual/class_il/forgetting") and is_score("eval/continual/ttl/average")
    assert not is_score("eval/continual/frozen/backward_transfer") and not is_score("eval/continual/ttl/corpus_ppl_end")


@pytest.mark.slow
def test_runs_with_long_context_scores_get_an_accuracy_by_length_chart(tmp_path, monkeypatch):
    """A second PNG, logged with the table, plots the pooled top-1 and exact match by context length of the runs that
    have them; a store without such scores gets no such chart (the other tests: three files)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = _client(uri)
    scores = {
        f"eval/long_context/all/{m}_len{n}": 0.5 / i for i, n in enumerate((64, 128, 256), 1) for m in ("exact", "top1")
    }
    _add_run(client, "memory", "hope-run", {**_summary(3.0, 100.0), **scores}, family="hope")
    _add_run(client, "memory", "plain-run", _summary(4.0, 900.0))
    board = build_leaderboard(out=tmp_path / "lb", tracking_uri=uri)
    assert board.long_context_chart == tmp_path / "lb" / "leaderboard-long_context.png"
    assert board.long_context_chart.read_bytes().startswith(PNG_MAGIC)
    names = {Path(a.path).name for a in client.list_artifacts(board.run_id)}
    assert "leaderboard-long_context.png" in names


@pytest.mark.slow
def test_a_large_experiments_description_lists_its_best_runs_within_mlflows_limit(tmp_path, monkeypatch):
    """A sweep's experiment holds many runs: the description lists the best ``NOTE_ROWS`` and says how many there are
    (the files keep them all), and fewer when the user's own text leaves too little of the tag's 20,000 characters;
    with no room at all the description is left as it was, with a warning."""
    from nlplatform.leaderboard import NOTE_LIMIT, NOTE_ROWS, NOTE_TAG

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = _client(uri)
    for i in range(NOTE_ROWS + 5):
        _add_run(client, "many", f"trial-{i:02d}", _summary(10.0 + i, 100.0))
    experiment = client.get_experiment_by_name("many").experiment_id
    board = build_leaderboard(["many"], out=tmp_path / "one", tracking_uri=uri)
    assert len(board.rows) == NOTE_ROWS + 5
    note = client.get_experiment(experiment).tags[NOTE_TAG]
    assert f"The best {NOTE_ROWS} of {NOTE_ROWS + 5}." in note
    assert "[trial-19]" in note and "[trial-20]" not in note  # val ppl 10 + i: the first twenty

    client.set_experiment_tag(experiment, NOTE_TAG, "x" * (NOTE_LIMIT - 2500))
    build_leaderboard(["many"], out=tmp_path / "two", tracking_uri=uri)
    note = client.get_experiment(experiment).tags[NOTE_TAG]
    assert len(note) <= NOTE_LIMIT and "The best 5 of 25." in note and note.endswith("x" * 100)

    client.set_experiment_tag(experiment, NOTE_TAG, "y" * NOTE_LIMIT)
    board = build_leaderboard(["many"], out=tmp_path / "three", tracking_uri=uri)
    assert client.get_experiment(experiment).tags[NOTE_TAG] == "y" * NOTE_LIMIT and board.experiment_ids == {}
