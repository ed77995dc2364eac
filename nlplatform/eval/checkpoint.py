"""The checkpoint a suite scores: its model on the default device, and the held-out (test) split of its corpus."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nlplatform.config import DataConfig


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(checkpoint: str | Path, device: str | None = None):
    """The checkpoint's model (eval mode), recipe, tokenizer and step, on ``device`` (default: ``default_device``)."""
    from nlplatform.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, device=device or default_device())


def heldout_documents(data: DataConfig) -> Iterator[str]:
    """The test split of the corpus ``data`` describes (the documents training held out), streamed."""
    from nlplatform.data import cache_root
    from nlplatform.data.corpus import split_stream

    return split_stream(data, "test", cache_root())


def heldout_tokens(loaded) -> list[int]:
    """The checkpoint corpus's test split (documents joined by blank lines), in the checkpoint's tokens."""
    return loaded.tokenizer.encode("\n\n".join(heldout_documents(loaded.recipe.data)))
