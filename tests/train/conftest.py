"""Helpers for tests that train through the command line: the fast recipe overrides, the corpus guard, ``run_cli``.

The session fixtures built on them (``trained_run``, ``family_run``) live in ``tests/conftest.py`` so that every test
folder (train, eval, sweeps) shares one trained checkpoint per family.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
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


class Interrupted(Exception):
    pass


class KillAt(L.Callback):
    """Dies at the start of optimizer step ``step + 1``, as a killed job would, after step ``step`` was checkpointed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupted(f"killed at step {self.step}")


def corpus_ready() -> bool:
    from nlplatform.data.corpus import default_corpus_present

    return default_corpus_present(Path(os.environ["NLPLATFORM_CACHE"]))


needs_corpus = pytest.mark.skipif(
    not corpus_ready(), reason="embedded corpus not fetched; run `make data` (make test does it first)"
)


def run_cli(*args: str, cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "nlplatform", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
