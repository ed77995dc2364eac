"""Fixtures for the data tests: an isolated cache, offline Hugging Face libraries, generated corpora.

No test here touches the network: corpora are generated text written under ``tmp_path``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

# Before `datasets` is imported anywhere: it reads these once, at import time.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = "to be or not that is the question whether tis nobler in mind suffer slings arrows café naïve 🦊 über".split()


def generate_docs(n: int, words: int = 200, seed: int = 0) -> list[str]:
    """``n`` distinct pseudo-English documents (with some non-ASCII words), reproducible from ``seed``."""
    rng = random.Random(seed)
    return [f"Document {i}.\n" + " ".join(rng.choice(WORDS) for _ in range(words)) + "\n" for i in range(n)]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point NLPLATFORM_CACHE at a fresh folder, so no test reads or writes the real cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("NLPLATFORM_CACHE", str(root))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


@pytest.fixture
def make_docs() -> Callable[..., list[str]]:
    return generate_docs


@pytest.fixture
def txt_corpus(tmp_path: Path) -> Callable[..., Path]:
    """Write generated documents as ``doc<i>.txt`` files (one document each) into a folder; return the folder."""

    def write(n: int = 10, words: int = 200, seed: int = 0, name: str = "corpus") -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, doc in enumerate(generate_docs(n, words, seed)):
            (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
        return folder

    return write
