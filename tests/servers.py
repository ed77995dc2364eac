"""Real servers for the tests: one PostgreSQL cluster and one MLflow tracking server per session.

PostgreSQL comes from the Debian package (`make postgres` installs it when missing; `make test` does that first).
Its ``initdb`` and ``pg_ctl`` refuse to run as root, so as root they run as the ``postgres`` user, in a temporary
folder that user owns. The cluster listens on a free port of 127.0.0.1 with password authentication (scram), so a
URL with a wrong or missing password is refused like on a real server, and its socket stays in the same folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PG_USER = "nlplatform"
PG_PASSWORD = "S3cretPW-tests"  # what the masking tests grep every output for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL's server programs (Debian keeps them out of PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    folder: Path
    port: int
    bindir: Path
    as_user: list[str]  # the prefix that runs a server program as the cluster's owner

    def url(self, database: str, password: str = PG_PASSWORD, driver: str = "postgresql") -> str:
        return f"{driver}://{PG_USER}:{password}@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str) -> None:
        proc = subprocess.run(
            [*self.as_user, str(self.bindir / program), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.folder,
        )
        if proc.returncode != 0:
            log = (self.folder / "server.log").read_text() if (self.folder / "server.log").exists() else ""
            raise RuntimeError(f"{program} failed: {proc.stderr[-2000:]}{log[-2000:]}")

    def create_database(self, name: str) -> None:
        self._run("createdb", "-h", str(self.folder), "-p", str(self.port), "-U", PG_USER, name)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres() -> Postgres:
    """initdb a fresh cluster in a temporary folder and start it; raises with what to do when PostgreSQL is absent."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: run `make postgres` (make test does it first)")
    # as root, in /tmp: the postgres user must reach the folder, and TMPDIR may be one only root can enter
    folder = Path(tempfile.mkdtemp(prefix="nlplatform-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    pg = Postgres(folder, free_port(), bindir, as_user)
    pwfile = folder / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if as_user:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    pg._run(
        "initdb",
        "-D",
        str(folder / "data"),
        "-U",
        PG_USER,
        f"--pwfile={pwfile}",
        "--auth-host=scram-sha-256",
        "--auth-local=trust",
        "--no-sync",
        "-E",
        "UTF8",
    )
    pwfile.unlink()
    options = f"-p {pg.port} -k {folder} -h 127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200"
    pg._run("pg_ctl", "-D", str(folder / "data"), "-o", options, "-l", str(folder / "server.log"), "-w", "start")
    return pg


ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TrackingServer:
    """``make tracking-server``: ``mlflow server`` on 127.0.0.1 with its backend store and artifact root (one worker),
    in a process group of its own so that ``stop`` ends the server with its workers."""

    uri: str
    process: subprocess.Popen
    announced: str  # what the make target printed

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_tracking_server(backend: str, artifacts: Path, log: Path, port: int | None = None) -> TrackingServer:
    """Start ``make tracking-server`` on a free port and wait until the server answers its health check."""
    port = port or free_port()
    out = open(log, "ab")  # noqa: SIM115 - the server writes into it until it is stopped
    process = subprocess.Popen(
        [
            "make",
            "-s",
            "-o",
            ".venv/.installed",
            "tracking-server",
            f"MLFLOW_PORT={port}",
            f"TRACKING_BACKEND={backend}",
            f"TRACKING_ARTIFACTS={artifacts}",
        ],
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server = TrackingServer(uri, process, "")
            server.stop()
            raise RuntimeError(f"make tracking-server did not start on {uri}: {log.read_text()[-3000:]}")
        time.sleep(0.25)
    return TrackingServer(uri, process, log.read_text().splitlines()[0])
