"""The delta-rule and Titans memory kernels build for an H100 (sm_90) here, without a GPU: the interpreter alone would
not catch code that runs in numpy but does not lower to GPU code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = 10  # six delta-rule kernels, the Titans memory's forward and backward as Titans and as HOPE run them


@pytest.mark.slow
def test_every_kernel_builds_for_sm90_and_reports_its_registers_within_an_h100s_shared_memory(tmp_path):
    """``python -m kernels.tools.build --quick`` compiles the ten kernel variants with Triton's bundled ptxas and
    reads their resources; the quick form writes no results files."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas, so it cannot build GPU code without a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "kernels.tools.build", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    regs = [int(r) for r in re.findall(r"regs=(\d+)", proc.stdout)]
    assert len(regs) == KERNELS, proc.stdout
    assert all(0 < r <= 255 for r in regs), proc.stdout
    shared = [int(b) for b in re.findall(r"shared=(\d+)", proc.stdout)]
    assert len(shared) == KERNELS and max(shared) <= 232448, proc.stdout
    assert not list(tmp_path.iterdir())


def test_the_build_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.tools.build", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "unset TRITON_INTERPRET" in proc.stderr
