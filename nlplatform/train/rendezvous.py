"""One decision for every process of a multi-process launch, made by global rank 0 before the Trainer exists.

How the processes of a run start decides how they learn rank 0's decision (the run folder, the checkpoint to resume):

- one process, or Lightning's own launcher (``trainer.devices=N`` started by a plain ``python``): ranks 1.. are
  started by rank 0 once its Trainer exists and inherit the decision through the environment (``run.resolve_run``);
- torchrun, srun, or any launcher that sets ``RANK`` / ``WORLD_SIZE`` (or SLURM's ``SLURM_PROCID`` /
  ``SLURM_NTASKS``): every process starts at once, so rank 0 hands its decision over a TCP key-value store
  (``torch.distributed.TCPStore``): torchrun's own store when its agent serves one, otherwise one that rank 0 serves
  on ``MASTER_PORT + 1`` (Lightning's process group later takes ``MASTER_PORT`` itself) until every rank has read.

Each rank then checks that it sees what rank 0 wrote (a marker file in the run folder): a run whose ``runs/`` is not
one shared file system across nodes would otherwise train each node into its own folder. Any refusal (bad input on
rank 0, a folder not shared) reaches every rank as the same one-line error. The data step reuses ``agree``: rank 0
prepares the token cache while the others wait, then every rank checks it sees the cache.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from nlplatform.errors import UserError

TIMEOUT_S = 600  # how long a rank waits for rank 0's decision (rank 0 may be preparing a first run's folder)


def launch_rank_world(num_nodes: int = 1) -> tuple[int, int]:
    """(rank, number of deciding processes) as the launcher set them; (0, 1) for a single process or Lightning's
    launcher on one node. Lightning's launcher on several nodes started by hand (``NODE_RANK`` and ``MASTER_ADDR`` set
    on each node) decides among the nodes' first processes: their ranks 1.. are their children."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    if "NODE_RANK" in os.environ and num_nodes > 1 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return int(os.environ["NODE_RANK"]), num_nodes
    return 0, 1


def _address() -> tuple[str, int]:
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    from lightning.fabric.plugins.environments import SLURMEnvironment  # derives both from the SLURM job

    env = SLURMEnvironment()
    return env.main_address, env.main_port


@dataclass
class Peers:
    """The processes of one launch and the store they talk through."""

    rank: int
    world: int
    store: Any  # torch.distributed.TCPStore
    prefix: str
    serving: bool  # rank 0 serves this store itself (it must outlive every rank's read)

    def agree(self, name: str, decide: Callable[[], dict], check: Callable[[dict], str | None]) -> dict:
        """Rank 0 runs ``decide`` (a JSON-able dict; a UserError there reaches every rank) while the others wait;
        every rank runs ``check`` on the decision (None when fine, else what is wrong here); returns the decision once
        every rank is fine. ``name`` keeps the agreements of one launch apart (the run, then its data)."""
        prefix = f"{self.prefix}{name}/"
        key = prefix + "decision"
        if self.rank == 0:
            try:
                value = {"decision": decide()}
            except UserError as exc:
                value = {"error": str(exc)}
            self.store.set(key, json.dumps(value))
        else:
            value = json.loads(self.store.get(key))
        if "error" in value:
            self._done(prefix)
            raise UserError(value["error"])
        problem = check(value["decision"])
        self.store.set(f"{prefix}seen/{self.rank}", json.dumps({"host": socket.gethostname(), "problem": problem}))
        reports = [json.loads(self.store.get(f"{prefix}seen/{r}")) for r in range(self.world)]
        self._done(prefix)
        bad = [(r, rep) for r, rep in enumerate(reports) if rep["problem"]]
        if bad:
            shown = "; ".join(f"rank {r} on {rep['host']}: {rep['problem']}" for r, rep in bad[:4])
            raise UserError(f"the ranks of this launch disagree on the {name} ({shown})")
        return value["decision"]

    def _done(self, prefix: str) -> None:
        """Every rank but 0 says it has read everything; a serving rank 0 waits for that before its store goes."""
        if self.rank:
            self.store.add(prefix + "read", 1)
            return
        if self.serving:
            deadline = time.monotonic() + TIMEOUT_S
            while self.store.add(prefix + "read", 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(0.05)


def peers(num_nodes: int = 1) -> Peers | None:
    """The store shared by this launch's processes, or None when this process decides alone."""
    rank, world = launch_rank_world(num_nodes)
    if world <= 1:
        return None
    from torch.distributed import TCPStore

    host, port = _address()
    timeout = timedelta(seconds=TIMEOUT_S)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent serves a store on MASTER_PORT
        job = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        store = TCPStore(host, port, is_master=False, timeout=timeout)
        return Peers(rank, world, store, f"nlplatform/{job}/", serving=False)
    job = "/".join(os.environ.get(k, "0") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"))
    store = TCPStore(host, port + 1, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    return Peers(rank, world, store, f"nlplatform/{job}/", serving=rank == 0)
