"""Helpers the eval tests share: the guard on the real eval data, and the checkpoint of a family's trained run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nlplatform.eval.harness.data import eval_data_present

ROOT = Path(__file__).resolve().parents[2]
# The real cache (what `make eval-data` fills), resolved before any fixture redirects NLPLATFORM_CACHE.
REAL_ROOT = (
    Path(os.environ.get("NLPLATFORM_CACHE") or ROOT / ".cache" / "nlplatform").expanduser() / "eval_data"
).resolve()

needs_eval_data = pytest.mark.skipif(
    not eval_data_present(REAL_ROOT), reason="eval data not fetched; run `make eval-data` (make test does it first)"
)


def checkpoint_of(family: str, trained_run, family_run) -> tuple[Path, str]:
    """The last checkpoint of the session's trained run of ``family`` and its tracking URI."""
    if family == "transformer":
        run_dir, uri, _ = trained_run
    else:
        run_dir, uri, _ = family_run(family)
    return run_dir / "checkpoints" / "last.ckpt", uri
