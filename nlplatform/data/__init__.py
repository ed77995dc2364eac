"""Data: corpora, tokenizers, token packing and the Lightning data module.

Importing this package does no work: the submodules (and their heavy imports, ``datasets``, ``tokenizers``,
``lightning``) load only when used. ``TextDataModule`` is resolved lazily on first access.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: readers never see half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_staging_dir(final: Path) -> Path:
    """A fresh folder beside ``final``, to be filled and then renamed to ``final`` in one atomic step.

    ``mkdtemp`` creates it private (0700); it is opened to 0755 so the renamed cache reads like any other folder.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-partial-", dir=final.parent))
    staging.chmod(0o755)
    return staging


def __getattr__(name: str) -> Any:
    # Lazy export: ``from nlplatform.data import TextDataModule`` imports Lightning only at that moment.
    if name == "TextDataModule":
        from nlplatform.data.datamodule import TextDataModule

        return TextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
