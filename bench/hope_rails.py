"""Tiny HOPE's inner-loop rails on one budget: which safety settings of the self-modifying memories the exact DGD rule
still needs, measured by training, beside tiny Titans and Transformer++ on the same tokens.

    python bench/hope_rails.py [--steps 150] [--rows "NAME;NAME"] [--baseline CHECKOUT] [--repeats N] [--name NAME]

Every row is a full run of ``nlplatform train`` (recipes/<family>/tiny.yaml with the row's overrides, ``--steps``
optimizer steps of 8 x 256 tokens, the recipe's seed, so every row sees the same batches), one after the other in a
fresh process with nothing else running. A row records the final validation loss and perplexity, training tokens/s
(the run's own throughput figure), wall time and the process's peak resident memory. The rails are:

- ``model.eta_max``: the bound of the memories' inner learning rate (0.1 before the exact rule, 0.3 asked for now);
- ``model.memory_max_grad_norm``: the per-token clip of the inner gradient (1.0, or null: none);
- ``model.memory_momentum_init``: the momentum decay the memories start from (0.5; 0.9 diverged under the
  linearised rule).

A rail is worth keeping only if removing it diverges or worsens the 150-step validation loss by more than 2%
(``KEEP_IF_WORSE``); the table says so per rail. ``--baseline CHECKOUT`` adds the default tiny HOPE row trained on
another revision's code (the chunk-start linearisation before the exact rule, for instance). ``--repeats N`` runs
the whole list N times round-robin (so a drift of the shared CPU hits every row alike) and reports each row's median
tokens/s. Writes bench/results/<name>-<device>.json and .md (``--name``, default hope-rails; CPU only: the rows are
what `make train` runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import device_and_label, write_results

ROOT = Path(__file__).resolve().parent.parent
KEEP_IF_WORSE = 0.02  # a rail stays if removing it worsens the val loss by more than this fraction (or diverges)


def _hope(eta_max: float, clip: float | None, momentum: float) -> tuple[str, str, list[str]]:
    """A HOPE row with its three rails set explicitly (the recipe's defaults may move)."""
    name = f"hope: eta_max {eta_max}, {'no clip' if clip is None else f'clip {clip}'}, momentum {momentum}"
    keys = [
        f"model.eta_max={eta_max}",
        f"model.memory_max_grad_norm={'null' if clip is None else clip}",
        f"model.memory_momentum_init={momentum}",
    ]
    return name, "hope", keys


# (row, family, overrides): the rails of the linearised rule, each rail removed or changed, the rails-free candidate,
# and the baselines on the same tokens
ROWS: list[tuple[str, str, list[str]]] = [
    _hope(0.1, 1.0, 0.5),
    _hope(0.3, 1.0, 0.5),
    _hope(0.1, None, 0.5),
    _hope(0.3, None, 0.5),
    _hope(0.3, None, 0.9),
    ("titans", "titans", []),
    ("transformer++", "transformer", []),
]


def train_row(name: str, family: str, overrides: list[str], *, steps: int, work: Path, code: Path) -> dict:
    """One run through the command line on ``code``'s package (PYTHONPATH first), in its own folder; the child's
    peak resident set comes from wait4."""
    out = work / name.replace(" ", "_").replace(",", "").replace(":", "")
    out.mkdir(parents=True)
    args = [
        sys.executable,
        "-m",
        "nlplatform",
        "train",
        str(code / "recipes" / family / "tiny.yaml"),
        *overrides,
        f"trainer.max_steps={steps}",
        "data.batch_size=8",
        "data.seq_len=256",
        "trainer.enable_progress_bar=false",
        f"output_dir={out / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{out / 'mlruns.db'}",
        "tracking.experiment=rails",
    ]
    env = {
        "NLPLATFORM_CACHE": str(ROOT / ".cache" / "nlplatform"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        **os.environ,
        "PYTHONPATH": str(code),
        "PYTHONWARNINGS": "ignore",
    }  # the project's data cache, offline
    t0 = time.time()
    with open(out / "stdout", "w") as so, open(out / "stderr", "w") as se:
        proc = subprocess.Popen(args, cwd=out, env=env, stdout=so, stderr=se)
        _, status, usage = os.wait4(proc.pid, 0)
    row = {
        "row": name,
        "family": family,
        "overrides": overrides,
        "wall_s": time.time() - t0,
        "peak_rss_gib": usage.ru_maxrss / 2**20,
        "exit_code": os.waitstatus_to_exitcode(status),
    }
    lines = (out / "stdout").read_text().strip().splitlines()
    summary = Path(lines[-1]) / "summary.json" if lines else None
    if row["exit_code"] != 0 or summary is None or not summary.is_file():
        tail = (out / "stderr").read_text().strip().splitlines()
        return {**row, "error": (tail[-1] if tail else "no output").split(";")[0][:200]}  # the first clause
    s = json.loads(summary.read_text())
    return {**row, **{k: s.get(k) for k in ("val_loss", "val_ppl", "unigram_ppl", "train_loss", "tokens_per_sec")}}


def merged(results: list[dict]) -> dict:
    """One row from its repeats: the first run's figures, with the median tokens/s and wall time of all of them,
    every run's tokens/s and the largest peak memory."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    row = dict(ok[0])
    for key in ("tokens_per_sec", "wall_s"):
        row[key] = statistics.median(r[key] for r in ok)
    row["tokens_per_sec_runs"] = [r["tokens_per_sec"] for r in ok]
    row["val_loss_runs"] = [r["val_loss"] for r in ok]
    row["peak_rss_gib"] = max(r["peak_rss_gib"] for r in ok)
    return row


def verdicts(rows: list[dict]) -> list[str]:
    """Per rail: the loss with and without it (the rest as in the candidate without rails), and whether it stays."""
    by = {r["row"]: r for r in rows}

    def loss(name: str) -> float | None:
        r = by.get(name)
        return None if r is None or "error" in r or r.get("val_loss") is None else r["val_loss"]

    pairs = [  # (rail, row with the rail, row without it)
        (
            "inner-gradient clip 1.0",
            "hope: eta_max 0.3, clip 1.0, momentum 0.5",
            "hope: eta_max 0.3, no clip, momentum 0.5",
        ),
        (
            "eta_max 0.1 (against 0.3)",
            "hope: eta_max 0.1, no clip, momentum 0.5",
            "hope: eta_max 0.3, no clip, momentum 0.5",
        ),
        (
            "momentum starting at 0.5 (against 0.9)",
            "hope: eta_max 0.3, no clip, momentum 0.5",
            "hope: eta_max 0.3, no clip, momentum 0.9",
        ),
    ]
    out = []
    for rail, on, off in pairs:
        if on not in by or off not in by:  # --rows left one of the pair out: nothing to say about this rail
            continue
        a, b = loss(on), loss(off)
        if a is None or b is None:
            failed = off if b is None else on
            out.append(
                f"- {rail}: {failed!r} did not finish ({by.get(failed, {}).get('error', 'not run')})"
                + (" -> keep it (removing it diverges)" if b is None and a is not None else "")
            )
            continue
        worse = (b - a) / a
        keep = worse > KEEP_IF_WORSE
        out.append(
            f"- {rail}: val loss {a:.4f} with it, {b:.4f} without ({100 * worse:+.1f}%) -> "
            + ("keep it" if keep else "drop it")
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rows", default=None, help="row names separated by ';' (default: all)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a checkout of another revision: its default tiny HOPE trains as one more row",
    )
    parser.add_argument("--repeats", type=int, default=1, help="run the list this many times, round-robin")
    parser.add_argument("--name", default="hope-rails", help="the results files' name")
    args = parser.parse_args()
    device, label = device_and_label()
    if device != "cpu":
        sys.exit("hope_rails.py measures the CPU recipe `make train` runs; run it on a CPU machine")
    chosen = ROWS if args.rows is None else [r for r in ROWS if r[0] in args.rows.split(";")]
    runs = [(name, family, overrides, ROOT) for name, family, overrides in chosen]
    if args.baseline is not None:
        rev = subprocess.run(
            ["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        runs.insert(0, (f"hope at {rev}: eta_max 0.1, clip 1.0, momentum 0.5", "hope", [], args.baseline.resolve()))
    done: dict[str, list[dict]] = {name: [] for name, *_ in runs}
    with tempfile.TemporaryDirectory(prefix="hope-rails-") as tmp:
        for repeat in range(args.repeats):
            for name, family, overrides, code in runs:
                r = train_row(name, family, overrides, steps=args.steps, work=Path(tmp) / str(repeat), code=code)
                done[name].append(r)
                shown = r.get("error") or (
                    f"val loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.2f}), {r['tokens_per_sec']:,.0f} tokens/s"
                )
                print(f"{name:>48}: {shown}, {r['wall_s']:.0f} s, peak {r['peak_rss_gib']:.2f} GiB", flush=True)
    rows = [merged(results) for results in done.values()]
    table = [
        f"## {args.steps} steps x 8 x 256 tokens (the `make train` budget), tiny recipes, {label}",
        "",
        "| row | val loss | val ppl | unigram ppl | train loss | tokens/s | wall s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            table.append(
                f"| {r['row']} | diverged or failed: {r['error']} | | | | | {r['wall_s']:.0f} | "
                f"{r['peak_rss_gib']:.2f} |"
            )
            continue
        runs = r.get("tokens_per_sec_runs", [])
        speed = f"{r['tokens_per_sec']:,.0f}" + (f" ({', '.join(f'{x:,.0f}' for x in runs)})" if len(runs) > 1 else "")
        table.append(
            f"| {r['row']} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {r['unigram_ppl']:.2f} | "
            f"{r['train_loss']:.4f} | {speed} | {r['wall_s']:.0f} | {r['peak_rss_gib']:.2f} |"
        )
    rails = verdicts(rows)
    if rails:
        table += [
            "",
            f"Rails (kept only if removing one diverges or worsens the val loss by more than "
            f"{100 * KEEP_IF_WORSE:.0f}%):",
            "",
            *rails,
        ]
    note = (
        "Each row is one `nlplatform train` run in a fresh process, one after another"
        + (
            f", the whole list {args.repeats} times round-robin (tokens/s and wall s: medians)"
            if args.repeats > 1
            else ""
        )
        + "; tokens/s is the run's own training throughput (summary.json), peak RSS the process's (wait4). Same "
        "seed and data order for every row. The CPU is a shared 2-core machine: read tokens/s within one run of "
        "this script."
    )
    meta = {
        "steps": args.steps,
        "batch": 8,
        "seq_len": 256,
        "threads": torch.get_num_threads(),
        "keep_if_worse": KEEP_IF_WORSE,
        "repeats": args.repeats,
    }
    write_results(args.name, label, meta, rows, table, note)


if __name__ == "__main__":
    main()
