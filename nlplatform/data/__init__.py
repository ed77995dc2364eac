"""Data: corpora, tokenizers, token packing and the Lightning data module.

Importing this package does no work: the submodules (and their heavy imports, ``datasets``, ``tokenizers``,
``lightning``) load only when used. ``TextDataModule`` is resolved lazily on first access.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nlplatform.files import atomic_write_text, make_staging_dir

if TYPE_CHECKING:
    from nlplatform.data.datamodule import TextDataModule

__all__ = ["TextDataModule", "atomic_write_text", "cache_root", "make_staging_dir"]


def cache_root() -> Path:
    """Where corpora, tokenizers and packed tokens are cached: ``$NLPLATFORM_CACHE`` or ``.cache/nlplatform``.

    The default is relative to the working directory (the repository root, git-ignored), so runs from the repo share
    one cache and nothing lands in ``$HOME``.
    """
    env = os.environ.get("NLPLATFORM_CACHE")
    return Path(env).expanduser() if env else Path(".cache/nlplatform")


def __getattr__(name: str) -> Any:
    # Lazy export: ``from nlplatform.data import TextDataModule`` imports Lightning only at that moment.
    if name == "TextDataModule":
        from nlplatform.data.datamodule import TextDataModule

        return TextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
