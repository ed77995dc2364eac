"""``nlplatform leaderboard``: every finished model run of the tracking store, ranked by validation perplexity.

The figures come from MLflow, not from the run folders, so the leaderboard also covers runs trained on other
machines into a shared store: ``summary/*`` metrics (logged at the end of ``train()``), ``eval/<task>/<metric>``
(logged by ``nlplatform eval``), the ``family`` / ``preset`` tags. The table is written as markdown, CSV and a PNG
chart (plus, when some runs have long-context scores, their accuracy by context length) into one folder and logged
as the artifacts of a run in the ``leaderboard`` experiment, so it shows in ``make ui`` beside the runs it ranks.

Sweep parents (tag ``sweep.role=study``) hold no model of their own and are left out; their trials are ordinary
runs and are ranked like any other.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from nlplatform.errors import UserError
from nlplatform.validate import suggest

LEADERBOARD_EXPERIMENT = "leaderboard"
# the eval column the leaderboard shows beside val ppl: the mean of the paper's accuracy columns a run was scored on
# (``nlplatform eval`` logs it with the scores, as a fraction like them)
AVG_METRIC = "eval/avg"
STUDY_TAG = ("sweep.role", "study")
PAGE = 1000  # MLflow's largest page for search_runs
STAMP = "%Y%m%d-%H%M%S"  # a leaderboard's time: its folder's and its run's name

# (row key, markdown header) of the fixed columns; the eval columns go between val_ppl and tokens_per_sec.
HEAD_COLUMNS = [
    ("run", "run"),
    ("family", "family"),
    ("preset", "preset"),
    ("params", "params"),
    ("tokens_seen", "tokens"),
    ("val_ppl", "val ppl"),
]
TAIL_COLUMNS = [
    ("tokens_per_sec", "tokens/s"),
    ("wall_s", "wall (min)"),
    ("experiment", "experiment"),
    ("run_id", "run id"),
]


@dataclass
class Leaderboard:
    rows: list[dict[str, Any]]  # one per run, best val ppl first; keys are the CSV columns
    columns: list[str]  # CSV column names in order (eval columns are their metric names)
    experiments: list[str]  # the experiments the rows come from
    folder: Path
    markdown: Path
    csv: Path
    chart: Path
    run_id: str  # the run in the `leaderboard` experiment holding the files
    long_context_chart: Path | None = None  # accuracy by context length, when some run has long-context scores
    experiment_ids: dict[str, str] | None = None  # name -> id of the ranked experiments (their pages show the board)


# ------------------------------------------------------------------------------------------------ collect


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _check_store(uri: str) -> None:
    """Opening a sqlite URI that points nowhere would create an empty database as a side effect; say instead that
    nothing was trained into it yet."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).exists():
        raise UserError(
            f"no tracking store at {uri} (nothing trained yet?); train runs with `make train` or `make compare`, "
            "or point MLFLOW_TRACKING_URI / --tracking-uri at your store"
        )


def _all_experiments(client) -> list:
    """Every active experiment of the store, across pages."""
    found, token = [], None
    while True:
        page = client.search_experiments(page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _select_experiments(client, names: list[str] | None) -> list:
    """The experiments named (each must exist), or all of them; never the leaderboard's own experiment."""
    existing = {e.name: e for e in _all_experiments(client) if e.name != LEADERBOARD_EXPERIMENT}
    if not names:
        return sorted(existing.values(), key=lambda e: e.name)
    chosen = []
    for name in dict.fromkeys(names):  # repeated names count once
        if name == LEADERBOARD_EXPERIMENT:
            raise UserError(f"experiment {name!r} holds leaderboards, not trained models; name a training experiment")
        if name not in existing:
            known = ", ".join(sorted(existing)) or "none"
            raise UserError(f"experiment {name!r} not found.{suggest(name, existing)} Experiments: {known}")
        chosen.append(existing[name])
    return chosen


def _finished_runs(client, experiment_ids: list[str]) -> list:
    """Every FINISHED run of the experiments, across pages (running, failed and killed runs have no final figures)."""
    if not experiment_ids:
        return []
    found, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string="attributes.status = 'FINISHED'", max_results=PAGE, page_token=token
        )
        found.extend(page)
        token = page.token
        if not token:
            return found


def _is_study(run) -> bool:
    key, value = STUDY_TAG
    return run.data.tags.get(key) == value


def _row(run, experiment: str) -> dict[str, Any]:
    """One run's leaderboard figures. Runs trained before ``summary/*`` metrics existed fall back to the last
    logged ``val/ppl``; what a run does not have stays None (a blank cell)."""
    metrics, tags, params = run.data.metrics, run.data.tags, run.data.params

    def number(key: str, cast=float):
        value = metrics.get(key)
        return cast(value) if value is not None and math.isfinite(value) else None

    val_ppl = number("summary/val_ppl")
    row = {
        "run": tags.get("mlflow.runName") or run.info.run_name or run.info.run_id,
        "family": tags.get("family") or params.get("model.name") or "",
        "preset": tags.get("preset") or params.get("model.preset") or "",
        "params": number("summary/params", int),
        "tokens_seen": number("summary/tokens_seen", int),
        "val_ppl": val_ppl if val_ppl is not None else number("val/ppl"),
        "tokens_per_sec": number("summary/tokens_per_sec"),
        "wall_s": number("summary/wall_s"),
        "experiment": experiment,
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,  # for links in the UI; not a CSV column
    }
    row.update({k: v for k, v in metrics.items() if k.startswith("eval/") and math.isfinite(v)})
    return row


def _sort_key(row: dict[str, Any]) -> tuple:
    # Runs without a validation perplexity go last, in name order.
    ppl = row["val_ppl"]
    return (ppl is None, ppl if ppl is not None else 0.0, row["run"])


def collect(experiments: list[str] | None = None, tracking_uri: str | None = None) -> tuple[list[dict], list[str]]:
    """(rows sorted by val ppl, names of the experiments they come from). Raises UserError for an unknown experiment
    or when no finished run is found. Reads only: nothing is written."""
    from nlplatform.tracking import tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    _check_store(uri)
    client = _client(uri)
    selected = _select_experiments(client, experiments)
    names = {e.experiment_id: e.name for e in selected}
    runs = [r for r in _finished_runs(client, list(names)) if not _is_study(r)]
    searched = [e.name for e in selected]
    if not runs:
        where = ", ".join(searched) if searched else "none (the store has no experiments)"
        raise UserError(
            f"no finished runs in {uri} (experiments searched: {where}); train some with `make train` or `make compare`"
        )
    rows = sorted((_row(r, names[r.info.experiment_id]) for r in runs), key=_sort_key)
    covered = [name for name in searched if any(row["experiment"] == name for row in rows)]
    return rows, covered


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The CSV columns: the fixed ones, with every eval metric any run has between val ppl and tokens/s: the eval
    average first, then the rest sorted (so a task's metrics sit together)."""
    evals = sorted({k for row in rows for k in row if k.startswith("eval/")}, key=lambda k: (k != AVG_METRIC, k))
    return [k for k, _ in HEAD_COLUMNS] + evals + [k for k, _ in TAIL_COLUMNS]


# -------------------------------------------------------------------------------------------------- write


def compact(value: float) -> str:
    """A count as people read it at a glance: 737, 3.9K, 307K, 4.2M, 1.3B (3 significant digits at most)."""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= limit:
            scaled = value / limit
            return (
                f"{scaled:.2g}{suffix}"
                if scaled < 10
                else f"{scaled:.3g}{suffix}"
                if scaled < 1000
                else f"{scaled:,.0f}{suffix}"
            )
    return f"{value:.3g}" if value != int(value) else f"{int(value)}"


def _cell(key: str, value: Any) -> str:
    """A value as the markdown table shows it: counts and rates compact (4.2M, 307K), perplexity with 3 decimals (as
    `nlplatform train` prints it), eval scores with 3 significant digits, wall time in minutes."""
    if value is None:
        return ""
    if key in ("params", "tokens_seen", "tokens_per_sec"):
        return compact(value)
    if key == "wall_s":
        return f"{value / 60:.1f}"
    if key == "val_ppl":
        return f"{value:.3f}"
    if key.startswith("eval/"):
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")  # a pipe in a run name would split the cell


# Short headers of the eval columns, by metric name: the task is the rest of the column name
METRIC_SHORT = {"acc": "", "acc_norm": " acc_n", "perplexity": " ppl", "word_perplexity": " ppl", "exact_match": " em"}


def header(column: str) -> str:
    """A column's markdown header: the fixed ones by name, eval scores by task (``eval/piqa/acc`` -> ``piqa``,
    ``eval/hellaswag/acc_norm`` -> ``hellaswag acc_n``, ``eval/long_context/all/exact_within`` -> ``lc exact
    within``)."""
    fixed = dict(HEAD_COLUMNS + TAIL_COLUMNS)
    if column in fixed:
        return fixed[column]
    if column == AVG_METRIC:
        return "eval avg"
    parts = column.split("/")[1:]
    if parts[0] == "long_context":
        return "lc " + parts[-1].replace("_", " ")
    if parts[0] == "continual":
        return "cl " + " ".join(parts[1:])
    task, metric = "/".join(parts[:-1]), parts[-1]
    return task.removesuffix("_openai") + METRIC_SHORT.get(metric, f" {metric}")


def is_score(column: str) -> bool:
    """False for lm-eval's bookkeeping metrics (``*_stderr``, ``sample_len``), the long-context suite's per-task,
    per-length metrics and the continual suite's transfer scores: the CSV keeps them, but they would bury the printed
    table (a full suite logs some 40 eval metrics per run, the long-context suite over 100)."""
    metric = column.rsplit("/", 1)[-1]
    if column.startswith("eval/long_context/"):  # per task and length in the CSV; pooled within/beyond in the table
        return column.startswith("eval/long_context/all/") and metric.endswith(("_within", "_beyond"))
    if column.startswith("eval/continual/"):  # average and forgetting per mode / setting in the table
        return metric in ("average", "forgetting")
    return not (column.startswith("eval/") and (metric.endswith("_stderr") or metric == "sample_len"))


def table_columns(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    """The columns people read: no ids (they are in the CSV), no eval bookkeeping (``is_score``), the experiment only
    when the runs come from more than one."""
    several = len({row["experiment"] for row in rows}) > 1
    return [c for c in cols if is_score(c) and c != "run_id" and (c != "experiment" or several)]


def markdown_table(rows: list[dict[str, Any]], cols: list[str], link=None, pad: str = "") -> str:
    """The ranked table for people (``table_columns``), numbers right-aligned. ``link(row)``: a URL for the run's
    name (the experiment page's copy links each run to its page in the UI); ``pad``: appended to every cell (the
    UI draws description tables without cell padding)."""
    cols = table_columns(rows, cols)
    numeric = {c for c in cols if c not in ("run", "family", "preset", "experiment")}
    lines = [
        f"| #{pad} | " + " | ".join(header(c) + pad for c in cols) + " |",
        "|--:|" + "".join("--:|" if c in numeric else "---|" for c in cols),
    ]
    for rank, row in enumerate(rows, 1):
        cells = [_cell(c, row.get(c)) for c in cols]
        if link is not None:
            cells[cols.index("run")] = f"[{cells[cols.index('run')]}]({link(row)})"
        lines.append(f"| {rank}{pad} | " + " | ".join(cell + pad for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]], cols: list[str]) -> None:
    # Raw values (full precision, no separators) so the CSV reads back as numbers; missing ones are empty.
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, restval="", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def plot_chart(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Two horizontal bar panels, validation perplexity and tokens/s, one bar per run (best at the top), coloured
    by family so a family's runs read as a group."""
    from matplotlib.patches import Patch

    from nlplatform.plots import pyplot

    plt = pyplot()

    families = list(dict.fromkeys(r["family"] for r in rows))
    palette = plt.get_cmap("tab10")
    colour = {f: palette(i % 10) for i, f in enumerate(families)}
    labels = [r["run"] for r in rows]
    colours = [colour[r["family"]] for r in rows]
    nan = float("nan")  # a missing figure draws no bar

    # Sized for MLflow's artifact preview pane (about 800 px wide): drawn at 800 px, so text stays at its point size
    fig, axes = plt.subplots(1, 2, figsize=(8, 1.3 + 0.3 * len(rows)), dpi=100, sharey=True)
    for ax, key, label, fmt in (
        (axes[0], "val_ppl", "val perplexity (lower is better)", lambda v: f"{v:.3f}"),
        (axes[1], "tokens_per_sec", "tokens/s (higher is better)", compact),
    ):
        values = [r[key] if r[key] is not None else nan for r in rows]
        bars = ax.barh(range(len(rows)), values, color=colours)
        ax.bar_label(bars, labels=["" if math.isnan(v) else fmt(v) for v in values], padding=2, fontsize=8)
        ax.margins(x=0.2)  # room for the labels
        ax.set_xlabel(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()  # shared y: the best run on top in both panels
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    fig.legend(
        handles=[Patch(color=colour[f], label=f or "?") for f in families],
        loc="upper right",
        fontsize=7,
        ncol=len(families),
        frameon=False,
    )  # on the title's line, clear of the bars
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path)
    plt.close(fig)


LONG_CONTEXT_KEY = re.compile(r"eval/long_context/all/(exact|top1)_len(\d+)$")


def plot_long_context(path: Path, rows: list[dict[str, Any]], title: str) -> bool:
    """Pooled long-context accuracy by context length, top-1 rank and exact match, one line per run that was scored
    (``nlplatform eval --suite long_context``). False (nothing written) when no run has these scores."""
    series: dict[str, dict[str, dict[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            match = LONG_CONTEXT_KEY.match(key)
            if match:
                series.setdefault(row["run"], {}).setdefault(match[1], {})[int(match[2])] = value
    if not series:
        return False
    from nlplatform.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    for ax, metric, label in (
        (axes[0], "top1", "top-1 of the true answer among 10"),
        (axes[1], "exact", "exact match"),
    ):
        for run, by_metric in series.items():
            points = sorted(by_metric.get(metric, {}).items())
            if points:
                ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=run)
        if metric == "top1":
            ax.axhline(0.1, color="grey", linestyle="--", linewidth=0.8, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy, all probe tasks")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------- the UI's copy

NOTE_TAG = "mlflow.note.content"  # an experiment's description: the top of its page in the MLflow UI (markdown)
# The leaderboard's section of a description, between these markers; anything else a user wrote there is kept
NOTE_START, NOTE_END = "<!-- nlplatform:leaderboard -->", "<!-- /nlplatform:leaderboard -->"
# The description's table: what a glance needs (every column stays in the leaderboard's files)
NOTE_COLUMNS = ["run", "family", "params", "tokens_seen", "val_ppl", AVG_METRIC, "tokens_per_sec"]
NOTE_ROWS = 20  # the best runs the description lists (a sweep's experiment holds hundreds; the files hold them all)
NOTE_LIMIT = 20_000  # characters MLflow stores in an experiment tag


def experiment_note(
    rows: list[dict[str, Any]], stamp: str, files_link: tuple[str, str] | None = None, top: int = NOTE_ROWS
) -> str:
    """The leaderboard section of one experiment's description (its own runs, best first): a headline the collapsed
    description shows (the best run), the compact table of the ``top`` best with each run linked to its page, and
    where the full files are."""
    best = rows[0]
    ppl = f", val ppl {best['val_ppl']:.3f}" if best["val_ppl"] is not None else ""
    plural = "run" if len(rows) == 1 else "runs"
    shown = rows[:top]
    cols = [c for c in NOTE_COLUMNS if any(row.get(c) is not None for row in shown) or c in ("run", "val_ppl")]
    table = markdown_table(
        shown, cols, link=lambda r: f"#/experiments/{r['experiment_id']}/runs/{r['run_id']}", pad="&emsp;"
    )
    rest = f"The best {len(shown)} of {len(rows)}. " if len(shown) < len(rows) else ""
    more = f" Every run and column, the CSV and the charts: [{files_link[0]}]({files_link[1]})." if files_link else ""
    return (
        f"#### Leaderboard: {best['run']} first{ppl} ({len(rows)} {plural} ranked by val ppl)\n\n{table}\n"
        f"{rest}Updated {stamp} by `nlplatform leaderboard`.{more}"
    )


def merge_note(existing: str | None, section: str) -> str:
    """``existing`` description with its leaderboard section replaced by ``section`` (put first when it has none)."""
    block = f"{NOTE_START}\n{section}\n{NOTE_END}"
    if not existing:
        return block
    start, end = existing.find(NOTE_START), existing.find(NOTE_END)
    if start >= 0 and end > start:
        return existing[:start] + block + existing[end + len(NOTE_END) :]
    return f"{block}\n\n{existing}"


def publish(uri: str, rows: list[dict[str, Any]], stamp: str, board: tuple[str, str] | None = None) -> dict[str, str]:
    """Write each ranked experiment's leaderboard into its description, so its page in the MLflow UI opens on it.
    ``board``: (experiment id, run id) of the leaderboard run holding the files. Returns {name: id} of the
    experiments written."""
    client = _client(uri)
    files_link = (
        None if board is None else (f"leaderboard-{stamp}", f"#/experiments/{board[0]}/runs/{board[1]}/artifacts")
    )
    by_experiment: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_experiment.setdefault(row["experiment_id"], []).append(row)
    written = {}
    for experiment_id, own in by_experiment.items():
        existing = client.get_experiment(experiment_id).tags.get(NOTE_TAG)
        # fewer rows when the user's own text leaves too little room in the tag
        notes = (merge_note(existing, experiment_note(own, stamp, files_link, top)) for top in (NOTE_ROWS, 5, 1))
        note = next((n for n in notes if len(n) <= NOTE_LIMIT), None)
        if note is None:
            print(
                f"warning: experiment {own[0]['experiment']!r}: its description leaves no room for the leaderboard "
                f"(MLflow keeps {NOTE_LIMIT:,} characters); shorten it",
                file=sys.stderr,
            )
            continue
        client.set_experiment_tag(experiment_id, NOTE_TAG, note)
        written[own[0]["experiment"]] = experiment_id
    return written


def announce(experiment_ids: dict[str, str] | None, uri: str) -> None:
    """On stderr: the page of each experiment whose description now holds its leaderboard, in the MLflow UI serving
    ``uri`` (for a sqlite store, the one ``make ui`` serves)."""
    from nlplatform.tracking import UI_QUERY, ui_link

    for name, experiment in (experiment_ids or {}).items():
        link = ui_link(uri, experiment) or f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?{UI_QUERY} (make ui)"
        print(f"leaderboard of {name!r} in the MLflow UI: {link}", file=sys.stderr)


def publish_experiments(experiments: list[str], uri: str) -> dict[str, str]:
    """Rank ``experiments`` and write their descriptions only (no files, no leaderboard run): what a sweep does when
    it ends. Returns {name: id} of the experiments written."""
    rows, _ = collect(experiments, uri)
    return publish(uri, rows, datetime.now().strftime(STAMP))


def _log_run(uri: str, stamp: str, experiments: list[str], rows: list[dict], files: list[Path]) -> tuple[str, str]:
    """A run in the ``leaderboard`` experiment holding the files: (experiment id, run id)."""
    from mlflow.entities import RunStatus

    from nlplatform.tracking import experiment_id as find_or_create

    client = _client(uri)
    experiment_id = find_or_create(client, LEADERBOARD_EXPERIMENT)
    tags = {"leaderboard.experiments": ",".join(experiments)}
    run = client.create_run(experiment_id, run_name=f"leaderboard-{stamp}", tags=tags)
    run_id = run.info.run_id
    try:
        client.log_metric(run_id, "leaderboard/runs", len(rows))
        for path in files:
            client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return experiment_id, run_id


def build_leaderboard(
    experiments: list[str] | None = None, out: str | Path | None = None, tracking_uri: str | None = None
) -> Leaderboard:
    """Rank the finished runs of ``experiments`` (all when None) and write ``leaderboard.md``, ``leaderboard.csv``
    and ``leaderboard.png`` into ``out`` (default ``runs/leaderboard/<timestamp>/``), then log them to MLflow.
    Everything is collected before the first file is written, so bad input leaves no folder behind."""
    from nlplatform.tracking import tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    rows, covered = collect(experiments, uri)
    cols = columns(rows)

    stamp = datetime.now().strftime(STAMP)
    folder = Path(out) if out is not None else Path("runs") / "leaderboard" / stamp
    folder.mkdir(parents=True, exist_ok=True)
    md, table, chart = folder / "leaderboard.md", folder / "leaderboard.csv", folder / "leaderboard.png"
    md.write_text(markdown_table(rows, cols))
    write_csv(table, rows, cols)
    plural = "run" if len(rows) == 1 else "runs"
    title = f"{len(rows)} {plural} of {', '.join(covered)} ({stamp})"
    plot_chart(chart, rows, title)
    files = [md, table, chart]
    long_context = folder / "leaderboard-long_context.png"
    if plot_long_context(long_context, rows, f"needle-in-a-haystack probes by length: {title}"):
        files.append(long_context)
    board = _log_run(uri, stamp, covered, rows, files)
    ids = publish(uri, rows, stamp, board)
    return Leaderboard(
        rows, cols, covered, folder, md, table, chart, board[1], long_context if long_context.exists() else None, ids
    )
