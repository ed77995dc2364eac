"""The life of a run folder: reserved once, locked while a process trains in it, finished at the end.

- **Reserved atomically.** A new run's folder is claimed by creating its lock file with ``O_EXCL`` the moment the run
  is resolved, before the data step or the model: two runs of one recipe started in the same second (a SLURM array)
  get two folders (the default name gains ``-2``, ``-3``, ...), and an explicit ``tracking.run_name`` that is taken is
  refused.
- **Locked while training.** ``run.lock`` holds the host, process id and start time of the process training in the
  folder; it is removed when that process ends, however it ends. A lock whose process no longer runs on this host
  (a kill, a crash, a lost node on the same host) is stale and taken over with a message; a lock of another host
  is trusted (its process may still run: remove the file by hand once it does not).
- **Finished at the end.** ``run.json`` records ``finished`` when the final validation and ``summary.json`` are written;
  a resume records itself under ``resumes`` and clears ``finished`` until it ends in turn.

``trainer.resume=auto`` continues only an unfinished run that is not running now, and says which; a finished or
running run is never reopened by ``auto``. ``trainer.resume=PATH`` continues the run whose ``last.ckpt`` PATH is (a
finished one too, when ``trainer.max_steps`` is raised), and forks any other checkpoint (a best one, a copied file)
into a new run folder.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from nlplatform.errors import UserError
from nlplatform.files import atomic_write_text, clean_stale_temporaries, fsync_dir, process_alive

LOCK = "run.lock"
_HOST = socket.gethostname()


@dataclass
class Lock:
    """What a lock file says: who trains in the folder."""

    host: str
    pid: int
    started: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}"

    def alive(self) -> bool:
        """Whether the process may still run. A half-written lock (pid -1) is nobody's; on another host the process
        cannot be checked, so it is assumed to run."""
        if self.pid < 0:
            return False
        return self.host != _HOST or process_alive(self.pid)


def read_lock(run_dir: Path) -> Lock | None:
    try:
        data = json.loads((run_dir / LOCK).read_text())
        return Lock(str(data["host"]), int(data["pid"]), str(data.get("started", "?")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # half-written by a process killed mid-write: nobody's
        return Lock("?", -1, "?")


def _create_lock(run_dir: Path) -> bool:
    """Create ``run_dir/run.lock`` for this process with O_EXCL; False when it exists already."""
    try:
        fd = os.open(run_dir / LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"host": _HOST, "pid": os.getpid(), "started": started}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(run_dir)
    return True


def acquire(run_dir: Path) -> None:
    """Lock an existing run folder for this process, taking over a stale lock; refuse one held by a live process."""
    for _ in range(3):  # a stale lock removed by another process at the same moment: try again
        if _create_lock(run_dir):
            return
        held = read_lock(run_dir)
        if held is None:
            continue
        if held.pid == os.getpid() and held.host == _HOST:
            return  # this process holds it already (a train() that resolved the run before)
        if held.alive():
            raise UserError(
                f"run {run_dir} is running now ({held.describe()}); wait for it to end, or remove "
                f"{run_dir / LOCK} if that process is gone"
            )
        print(
            f"run {run_dir}: taking over the lock of a process that no longer runs ({held.describe()})", file=sys.stderr
        )
        (run_dir / LOCK).unlink(missing_ok=True)
    raise UserError(f"run {run_dir}: could not take its lock {run_dir / LOCK}")


def release(run_dir: Path) -> None:
    """Remove this process's lock (another process's is left alone)."""
    held = read_lock(run_dir)
    if held is not None and held.pid == os.getpid() and held.host == _HOST:
        (run_dir / LOCK).unlink(missing_ok=True)


def reserve(experiment_dir: Path, name: str, *, explicit: bool) -> tuple[Path, Path | None]:
    """Claim a new run folder ``experiment_dir/name`` (its lock created with O_EXCL). A default name that is taken
    gains a suffix; an explicit one that holds another run is refused. Returns the folder and the outermost folder
    this call created above it (None if ``experiment_dir`` existed), for ``abandon``."""
    experiment_dir = experiment_dir.absolute()
    created = next((p for p in reversed([experiment_dir, *experiment_dir.parents]) if not p.exists()), None)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        run_dir = experiment_dir / (name if n == 1 else f"{name}-{n}")
        try:
            run_dir.mkdir()
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        taken = any(p.name != LOCK for p in run_dir.iterdir()) or not _create_lock(run_dir)
        if not taken:
            return run_dir.resolve(), created
        if explicit:
            raise UserError(
                f"run folder {run_dir} already holds a run; pick another tracking.run_name, or continue it with "
                "trainer.resume=auto"
            )
    raise UserError(f"no free run folder for {experiment_dir / name} (tried 999 names)")


def abandon(run_dir: Path, created: Path | None = None) -> None:
    """Undo a reservation that never started (bad input found after the folder was claimed): remove the folder if it
    holds nothing but this process's lock, and the empty folders above it up to ``created`` (what ``reserve`` made)."""
    release(run_dir)
    stop = created.parent if created is not None else run_dir.parent
    folder = run_dir
    while folder != stop and folder != folder.parent:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


# ------------------------------------------------------------------------------------------- run.json


def read_meta(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "run.json", json.dumps(meta, indent=2) + "\n")


def finished(run_dir: Path) -> bool:
    """Whether the run ended (final validation and summary written). Runs from before ``run.json`` recorded it count
    as finished when they have a summary."""
    meta = read_meta(run_dir)
    if "finished" in meta:
        return bool(meta["finished"])
    return (run_dir / "summary.json").is_file()


def mark_finished(run_dir: Path) -> None:
    meta = read_meta(run_dir)
    meta["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_meta(run_dir, meta)


def clean(run_dir: Path) -> None:
    """Remove what writers killed mid-write left in the run folder (temporary checkpoints and files)."""
    for folder in (run_dir, run_dir / "checkpoints"):
        for path in clean_stale_temporaries(folder):
            print(f"removed a stale temporary file: {path}", file=sys.stderr)


# ------------------------------------------------------------------------------------------- auto


@dataclass
class Candidate:
    run_dir: Path
    ckpt: Path
    state: str  # "unfinished" | "finished" | "running"


def auto_candidates(experiment_dir: Path, family: str, preset: str) -> list[Candidate]:
    """Every run of ``experiment_dir`` with a ``last.ckpt`` and a recipe of this family and preset, newest first."""
    found = []
    for ckpt in experiment_dir.glob("*/checkpoints/last.ckpt"):
        run_dir = ckpt.parent.parent
        try:
            saved = OmegaConf.load(run_dir / "recipe.yaml")
        except Exception:  # no recipe or not one of ours: not a run of this platform
            continue
        if saved.get("model", {}).get("name") != family or saved.get("model", {}).get("preset") != preset:
            continue
        lock = read_lock(run_dir)
        if lock is not None and lock.alive():
            state = "running"
        else:
            state = "finished" if finished(run_dir) else "unfinished"
        found.append((ckpt.stat().st_mtime, Candidate(run_dir.resolve(), ckpt, state)))
    return [c for _, c in sorted(found, key=lambda t: -t[0])]


def fork_name(source_run: str, step: int) -> str:
    return f"{source_run}-from-step{step}"
