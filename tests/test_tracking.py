"""The MLflow store: a fresh sqlite store survives concurrent first use."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

# Waits for the go file, then opens the store as every command does (nlplatform.tracking.client) and writes to it.
OPEN = """
import sys, time
from pathlib import Path
from nlplatform.tracking import client
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.001)
mlflow = client(sys.argv[1])
mlflow.create_experiment(sys.argv[4])
print("opened")
"""


@pytest.mark.slow
def test_three_processes_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """MLflow migrates a new sqlite database on first use; three processes doing it at the same moment used to crash
    two of three ("duplicate column name: step"). Released together by one file, all three open it and write."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN, uri, str(go), str(ready[i]), f"experiment-{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(3)
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):  # every process has imported MLflow and waits
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outputs]
    assert all(out.strip() == "opened" for out, _ in outputs)
    from mlflow.tracking import MlflowClient

    names = {e.name for e in MlflowClient(uri).search_experiments()}
    assert {"experiment-0", "experiment-1", "experiment-2"} <= names
