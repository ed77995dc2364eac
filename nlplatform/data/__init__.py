"""Data: corpora, tokenizers, token packing and the Lightning data module.

Importing this package does no work: the submodules (and their heavy imports, ``datasets``, ``tokenizers``,
``lightning``) load only when used; the Lightning data module is ``nlplatform.data.datamodule.TextDataModule``.
"""

from __future__ import annotations

import os
from pathlib import Path

from nlplatform.files import atomic_write_text, make_staging_dir

__all__ = ["atomic_write_text", "cache_root", "make_staging_dir"]


def cache_root() -> Path:
    """Where corpora, tokenizers and packed tokens are cached: ``$NLPLATFORM_CACHE`` or ``.cache/nlplatform``.

    The default is relative to the working directory (the repository root, git-ignored), so runs from the repo share
    one cache and nothing lands in ``$HOME``.
    """
    env = os.environ.get("NLPLATFORM_CACHE")
    return Path(env).expanduser() if env else Path(".cache/nlplatform")
