"""Durable, atomic file writes and the cleaning of what interrupted writes leave behind.

Every file the platform writes for keeps (run folders, checkpoints, caches, reports) is written to a temporary name
beside its destination, flushed to disk (``fsync``), renamed over the destination, and the folder's entry is synced
too: after a crash or a power loss a reader finds the old file or the new one, never an empty or half-written one.

Temporary names carry the host and process that made them (``.<name>.tmp-<host>-<pid>-<random>``), so a later process
on the same host can tell a temporary whose writer died (removed by ``clean_stale_temporaries``) from one still being
written. Files and folders are created with the modes the process's umask gives (``tempfile`` would make them private),
so a shared cache or run folder reads like any other.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_write_text",
    "clean_stale_temporaries",
    "exclusive_lock",
    "fsync_dir",
    "process_alive",
    "make_staging_dir",
    "replace_durably",
    "temporary_tag",
]

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
# .<name>.tmp-<host>-<pid>[-<random>] for files, .<name>-partial-<host>-<pid>-<random> for staging folders and
# .<name>-stale-<host>-<pid>-<random> for a folder's replaced contents on their way out
_TEMPORARY = re.compile(r"^\..+(?:\.tmp|-partial|-stale)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?$")


def temporary_tag() -> str:
    """``<host>-<pid>``: what a temporary name carries so a later process can tell whether its writer is alive."""
    return f"{_HOST}-{os.getpid()}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the process's umask (0644 under the usual 022)."""
    return 0o666 & ~_umask()


def fsync_file(path: Path) -> None:
    """Sync a file's contents to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Sync a folder's entries (a rename or a new file in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Sync ``tmp``'s contents, rename it over ``path`` and sync the folder: ``path`` is the old file or the new one,
    whole, even after a power loss."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` durably: readers never see
    half, and a crash leaves the old file. The file gets the umask's mode (0644 under the usual 022)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{temporary_tag()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_staging_dir(final: Path) -> Path:
    """A fresh folder beside ``final``, to be filled and then renamed to ``final`` in one atomic step. It gets the
    umask's mode (``mkdtemp`` would make it private), so the renamed folder reads like any other."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-partial-{temporary_tag()}-", dir=final.parent))
    staging.chmod(0o777 & ~_umask())
    return staging


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files and staging folders in ``folder`` whose writer was a process of this host that no
    longer runs (a crash or a kill mid-write). Those of live processes and of other hosts (a shared file system: their
    writers may still run) are kept. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if not match or match["host"] != _HOST or process_alive(int(match["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


@contextmanager
def exclusive_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block. ``waiting``: a line printed to stderr
    when another process holds it. The lock goes with the process: a killed holder never leaves it taken."""
    import fcntl

    with Path(path).open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(f"nlplatform: {waiting}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
