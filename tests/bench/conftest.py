"""Shared by the benchmark tests: the bench/bench_*.py scripts are files, not a package, so they are loaded by path
(the op benchmarks are modules, ``bench.ops.<op>``, imported as such)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def load_bench(monkeypatch):
    """``load_bench("bench_train_step")``: the script ``bench/<name>.py`` as a fresh module (its ``main`` runs in
    process)."""
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their sibling `common`

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
