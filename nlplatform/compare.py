"""``nlplatform compare`` (``make compare``): every family's tiny recipe on one data and token budget, each run
scored on an eval suite, then one leaderboard.

The families differ in their tiny recipes' batch sizes and step counts; a comparison only means something when they
see the same tokens, so every run gets the same ``data.seq_len``, ``data.batch_size``, ``trainer.max_steps`` and
validation interval (the recipes keep their own optimizer settings, as tuned for each family).

Each training and each evaluation runs in its own ``python -m nlplatform`` process: one family crashing (an error,
running out of memory, a kernel fault) cannot take the others down, and each run frees its memory when it ends.
Failures are collected and reported at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from nlplatform.errors import UserError
from nlplatform.leaderboard import Leaderboard, build_leaderboard
from nlplatform.validate import check_name

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# (label, recipe under recipes/): the label names the run, so HOPE and Hope-Attention (both family `hope`) stay apart.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("transformer", "transformer/tiny.yaml"),
    ("deltanet", "deltanet/tiny.yaml"),
    ("gated_deltanet", "gated_deltanet/tiny.yaml"),
    ("titans", "titans/tiny.yaml"),
    ("hope", "hope/tiny.yaml"),
    ("hope-attention", "hope/tiny_attention.yaml"),
)


@dataclass
class CompareResult:
    run_dirs: dict[str, Path] = field(default_factory=dict)  # label -> run folder, for every run that trained
    failures: list[str] = field(default_factory=list)  # one line per failed step, in order
    leaderboard: Leaderboard | None = None


def budget_overrides(steps: int, batch_size: int, seq_len: int, experiment: str) -> list[str]:
    """The overrides that put every family on the same data and token budget. Three validations per run (the last at
    ``steps``), whatever each recipe's own interval."""
    return [
        f"data.seq_len={seq_len}",
        f"data.batch_size={batch_size}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={max(1, steps // 3)}",
        f"tracking.experiment={experiment}",
    ]


def select_families(names: list[str] | None) -> list[tuple[str, str]]:
    """The (label, recipe) pairs named, in the order of ``FAMILIES``; all when ``names`` is empty."""
    if not names:
        return list(FAMILIES)
    labels = [label for label, _ in FAMILIES]
    for name in names:
        check_name(name, labels, "family", "Families")
    return [(label, recipe) for label, recipe in FAMILIES if label in names]


def select_optimizers(names: list[str] | None) -> list[str]:
    """The optimizers named (``nlplatform.optim.OPTIMIZERS``), checked; empty when none are."""
    from nlplatform.optim import OPTIMIZERS

    for name in names or []:
        check_name(name, OPTIMIZERS, "optimizer", "Optimizers")
    return list(names or [])


def optimizer_overrides(name: str) -> list[str]:
    """``optim.name``: the optimizer then trains at its default rate (``optim.DEFAULT_LR``); AdamW keeps each recipe's
    own tuned settings."""
    return [] if name == "adamw" else [f"optim.name={name}"]


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str | None]:
    """Run ``python -m nlplatform ARGS`` in a child process with its stdout echoed as it comes (its stderr, progress
    bar included, goes straight to the terminal); return its exit code and the last line of its stdout (the
    commands' contract: the path of what they wrote)."""
    cmd = [sys.executable, "-m", "nlplatform", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
        last = None
        for line in proc.stdout:
            print(line, end="", flush=True)
            last = line.strip() or last
        return proc.wait(), last


def _eval_data_ready() -> bool:
    from nlplatform.eval.harness.data import eval_data_present

    return eval_data_present()


def _train(label: str, recipe: Path, overrides: list[str], result: CompareResult) -> Path | None:
    code, last = _run_cli(["train", str(recipe), *overrides])
    run_dir = Path(last) if last else None
    if code != 0 or run_dir is None or not run_dir.is_dir():
        result.failures.append(f"{label}: training failed (exit {code}, {recipe})")
        return None
    result.run_dirs[label] = run_dir
    return run_dir


def _evaluate(label: str, run_dir: Path, suite: str, result: CompareResult) -> None:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # The eval data is local by now; offline mode keeps lm-eval / datasets from reaching for the hub.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    code, _ = _run_cli(["eval", str(ckpt), "--suite", suite], env=env)
    if code != 0:
        result.failures.append(f"{label}: evaluation failed (exit {code}, {ckpt})")


def compare(
    *,
    steps: int = 150,
    batch_size: int = 8,
    seq_len: int = 256,
    experiment: str | None = None,
    suite: str | None = "smoke",
    families: list[str] | None = None,
    optimizers: list[str] | None = None,
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
) -> CompareResult:
    """Train the chosen families (all by default) on one budget into ``experiment``, evaluate each new run on
    ``suite`` when the eval data is present (None: no evaluation), then build the experiment's leaderboard. Keeps
    going when a family fails; the failures are in the result.

    With ``optimizers``, every chosen family is trained once per optimizer (``<family>+<optimizer>`` runs, each
    optimizer at its default rate, ``optim.DEFAULT_LR``, AdamW with the recipe's own settings).

    The default experiment is named after the budget (``compare-<steps>x<batch>x<seq_len>``, with ``-optimizers``
    when comparing optimizers): repeated comparisons on one budget rank together, and runs on another budget never
    share their table."""
    for name, value in (("steps", steps), ("batch size", batch_size), ("sequence length", seq_len)):
        if value < 1:
            raise UserError(f"the {name} must be at least 1, got {value}")
    chosen = select_families(families)
    optims = select_optimizers(optimizers)
    if optims:
        chosen = [(f"{label}+{name}", recipe, optimizer_overrides(name)) for label, recipe in chosen for name in optims]
    else:
        chosen = [(label, recipe, []) for label, recipe in chosen]
    if suite is not None:
        from nlplatform.eval.harness.tasks import load_suite

        load_suite(suite)  # an unknown suite fails now, not after an hour of training
    evaluate = suite is not None and _eval_data_ready()
    if suite is not None and not evaluate:
        print("eval data not found (`make eval-data` fetches it once): training only, no evaluation", flush=True)

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    experiment = experiment or f"compare{'-optimizers' if optims else ''}-{steps}x{batch_size}x{seq_len}"
    shared = budget_overrides(steps, batch_size, seq_len, experiment)
    if tracking_uri:
        shared.append(f"tracking.tracking_uri={tracking_uri}")
    result = CompareResult()
    for i, (label, recipe, optim) in enumerate(chosen, 1):
        print(
            f"== [{i}/{len(chosen)}] {label}: training {recipe}, {steps} steps of {batch_size} x {seq_len} tokens",
            flush=True,
        )
        # The caller's overrides come last, so they win over the shared ones.
        run_overrides = [*shared, *optim, f"tracking.run_name={label.replace('+', '-')}-{stamp}", *(overrides or [])]
        run_dir = _train(label, RECIPES / recipe, run_overrides, result)
        if run_dir is not None and evaluate:
            print(f"== [{i}/{len(chosen)}] {label}: evaluating on suite {suite}", flush=True)
            _evaluate(label, run_dir, suite, result)

    print(f"== leaderboard of experiment {experiment!r}", flush=True)
    try:
        result.leaderboard = build_leaderboard([experiment], tracking_uri=tracking_uri)
    except UserError as exc:  # e.g. every family failed and the experiment holds no finished run
        result.failures.append(f"leaderboard: {exc}")
    return result
