"""Durable writes: files and folders honour the umask, every atomic rename is synced, and the temporaries a killed
writer left are cleaned while those of live writers are kept."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from nlplatform import files


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_staging_folders_honour_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        files.atomic_write_text(tmp_path / "a.json", "{}")
        staging = files.make_staging_dir(tmp_path / "cache")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o664 and _mode(staging) == 0o775
    old = os.umask(0o077)
    try:
        files.atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "b.json") == 0o600


def test_an_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1]
    )
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b))[1])
    files.atomic_write_text(tmp_path / "x.txt", "text")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]
    events.clear()
    tmp = tmp_path / ".y.tmp-x"
    tmp.write_text("y")
    files.replace_durably(tmp, tmp_path / "y")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)] and (tmp_path / "y").read_text() == "y"


def test_temporaries_of_dead_writers_are_removed_and_those_of_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = files.temporary_tag().rsplit("-", 1)[0]
    stale_file = tmp_path / f".last.ckpt.tmp-{host}-{dead.pid}"
    stale_dir = tmp_path / f".tokens-partial-{host}-{dead.pid}-abc123"
    live_file = tmp_path / f".run.json.tmp-{host}-{os.getpid()}-xyz"
    other_host = tmp_path / f".last.ckpt.tmp-elsewhere-{dead.pid}"
    kept = tmp_path / "last.ckpt"
    for path in (stale_file, live_file, other_host, kept):
        path.write_text("x")
    stale_dir.mkdir()
    (stale_dir / "train.bin").write_text("x")
    removed = files.clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert live_file.exists() and other_host.exists() and kept.exists()
