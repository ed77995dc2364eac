"""Rank 0 decides and every rank learns the decision before the Trainer exists (``nlplatform.train.rendezvous``): over
rank 0's own store when the launcher serves none (srun, a hand-set RANK / WORLD_SIZE), over torchrun's otherwise (the
torchrun test in test_distributed.py). A rank that cannot see the run folder refuses the launch on every rank."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys

import pytest

from nlplatform.errors import UserError
from nlplatform.train import rendezvous
from tests.train.conftest import FAST, TINY_RECIPE, needs_corpus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_USE_AGENT_STORE", "SLURM_PROCID")}
    return env | {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _agree(rank: int, world: int, port: int, fail: bool, out) -> None:
    os.environ.clear()
    os.environ.update(_launch_env(rank, world, port))
    group = rendezvous.peers()

    def decide() -> dict:
        if fail:
            raise UserError("rank 0 refused the recipe")
        return {"run_dir": "/runs/x", "pid": os.getpid()}

    try:
        out.put((rank, group.agree("run", decide, lambda d: None)))
    except UserError as exc:
        out.put((rank, str(exc)))


@pytest.mark.parametrize("fail", [False, True], ids=["decision", "refusal"])
def test_every_rank_gets_rank_0s_decision_or_its_refusal(fail):
    ctx = multiprocessing.get_context("fork")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_agree, args=(r, 3, port, fail, out)) for r in range(3)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    if fail:
        assert set(got.values()) == {"rank 0 refused the recipe"}
    else:
        assert len({str(v) for v in got.values()}) == 1 and got[0]["run_dir"] == "/runs/x"


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@needs_corpus
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -m` (root) to give one rank its own view of runs/")
def test_a_runs_folder_one_rank_cannot_see_is_refused_on_every_rank_and_left_empty(tmp_path):
    """Rank 1 runs in its own mount namespace with an empty file system over output_dir, as a node without the
    shared file system would: both ranks exit 2 naming the folder, and rank 0's reservation is removed again."""
    out = tmp_path / "runs"
    out.mkdir()
    port = _free_port()
    args = [
        sys.executable,
        "-m",
        "nlplatform",
        "train",
        str(TINY_RECIPE),
        *FAST,
        f"output_dir={out}",
        "tracking.enabled=false",
        "trainer.max_steps=2",
    ]
    isolated = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs tmpfs {out} && exec "$@"',
        "sh",
        *args,
    ]
    # a decision this test process made earlier, inherited by both ranks: a launcher's ranks must not take it
    stale = {"NLPLATFORM_RUN": json.dumps({"pid": os.getpid(), "run_dir": str(tmp_path / "stale"), "ckpt": None})}
    env = [_launch_env(rank, 2, port) | stale | {"PYTHONWARNINGS": "ignore"} for rank in range(2)]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, env=env[rank], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank, cmd in ((0, args), (1, isolated))
    ]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 2, err[-2000:]
        assert "rank 1 on" in err and "cannot see the run folder" in err and "Traceback" not in err
    assert not any(out.rglob("*")), sorted(out.rglob("*"))
