"""Shared training fixtures: small but real runs on the embedded corpus, trained once per test session.

Later test modules (eval, sweeps, generation of other families) reuse ``trained_run`` instead of training again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "nlplatform"
os.environ.setdefault("NLPLATFORM_CACHE", str(CACHE))

TINY_RECIPE = ROOT / "recipes" / "transformer" / "tiny.yaml"
# The tiny recipe shrunk further so a run takes seconds: same code paths, fewer FLOPs.
FAST = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "data.seq_len=64",
    "data.batch_size=8",
    "data.val_batches=4",
    "optim.warmup_steps=5",
    "trainer.enable_progress_bar=false",
]


def corpus_ready() -> bool:
    from nlplatform.data.corpus import default_corpus_present

    return default_corpus_present(Path(os.environ["NLPLATFORM_CACHE"]))


needs_corpus = pytest.mark.skipif(
    not corpus_ready(), reason="embedded corpus not fetched; run `make data` (make test does it first)"
)


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "nlplatform", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A 30-step run through the real command line, tracked in its own sqlite MLflow store.

    Returns (run_dir, tracking_uri, completed_process).
    """
    if not corpus_ready():
        pytest.skip("embedded corpus not fetched; run `make data` (make test does it first)")
    work = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{work / 'mlruns.db'}"
    proc = run_cli(
        "train",
        str(TINY_RECIPE),
        *FAST,
        "trainer.max_steps=30",
        "trainer.val_check_interval=10",
        "trainer.log_every_n_steps=2",
        "optim.lr=1e-2",
        f"output_dir={work / 'runs'}",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=tests",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    return run_dir, uri, proc


@pytest.fixture(scope="session")
def trained_summary(trained_run) -> dict:
    run_dir, _, _ = trained_run
    return json.loads((run_dir / "summary.json").read_text())
