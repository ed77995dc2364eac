"""Callbacks of a training run: throughput, levels, loss history, the final validation, atomic checkpoints."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from nlplatform.files import replace_durably, temporary_tag
from nlplatform.secrets import mask


def _accumulating(trainer: L.Trainer) -> bool:
    """True after a micro-batch that did not end with an optimizer step (gradient accumulation)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file, synced to disk and renamed into place (``nlplatform.files``): a
    crash or a power loss never leaves half a file or an empty ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{temporary_tag()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            replace_durably(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class Throughput(L.Callback):
    """Tokens per second of training (validation excluded) and, on GPUs with a known peak, model FLOPs utilisation.

    The clock runs from one optimizer step's end to the next, so data loading, forward, backward, the level
    scheduler and the optimizer are all counted; validation pauses it. MFU = achieved model FLOP/s / peak FLOP/s,
    with the model's FLOPs per token from ``model.flops_per_token`` (6 x parameters + attention) and the peak from
    Lightning's table of devices for the run's dtype.
    """

    def __init__(self, seq_len: int, log_every_n_steps: int) -> None:
        self.tokens_per_step = 0  # T_step, known once the module has set up its levels
        self.seq_len = seq_len
        self.every = log_every_n_steps
        self.train_seconds = 0.0
        self.steps_timed = 0
        self._window_seconds = 0.0
        self._window_steps = 0
        self._last: float | None = None
        self._peak_flops: float | None = None

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tokens_per_step = pl_module.level_scheduler.tokens_per_step
        if trainer.strategy.root_device.type == "cuda":
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self._peak_flops = get_available_flops(trainer.strategy.root_device, dtype)
        self._last = self._now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._last is not None:
            self._last = self._now(trainer)  # restart the clock after validation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _accumulating(trainer) or self._last is None:
            return
        now = self._now(trainer)
        dt, self._last = now - self._last, now
        self.train_seconds += dt
        self._window_seconds += dt
        self.steps_timed += 1
        self._window_steps += 1
        if trainer.global_step % self.every == 0 and self._window_seconds > 0:
            tokens_per_sec = self._window_steps * self.tokens_per_step / self._window_seconds
            metrics = {"perf/tokens_per_sec": tokens_per_sec}
            flops_per_token = getattr(pl_module.model, "flops_per_token", None)
            if self._peak_flops and flops_per_token is not None:
                achieved = tokens_per_sec * flops_per_token(self.seq_len)
                metrics["perf/mfu"] = achieved / (self._peak_flops * trainer.world_size)
            pl_module.log_dict(metrics, prog_bar=False)
            self._window_seconds, self._window_steps = 0.0, 0

    @property
    def tokens_per_sec(self) -> float:
        return self.steps_timed * self.tokens_per_step / self.train_seconds if self.train_seconds else 0.0


class LevelMonitor(L.Callback):
    """Prints one line per level when training starts, and logs each persistent level's update count."""

    def __init__(self, log_every_n_steps: int, log_params: bool = True) -> None:
        self.every = log_every_n_steps
        self.log_params = log_params  # False on resume: MLflow params are write-once

    def on_train_start(self, trainer, pl_module) -> None:
        rows = pl_module.level_table()
        rank_zero_info(f"levels (tokens per optimizer step: {pl_module.level_scheduler.tokens_per_step}):")
        for r in rows:
            period = f"every {r['period_steps']} step(s)" if r["period_steps"] else "inside forward"
            rank_zero_info(
                f"  level {r['level']:<16} scope={r['scope']:<10} params={r['params']:>12,} "
                f"chunk={r['chunk_tokens']:>9,} tokens  f={r['frequency']:g}  updates {period}  ({r['update_rule']})"
            )
        for logger in trainer.loggers if self.log_params else []:
            logger.log_hyperparams(
                {f"level.{r['level']}.{k}": r[k] for r in rows for k in ("scope", "chunk_tokens", "period_steps")}
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _accumulating(trainer) or trainer.global_step % self.every:
            return
        updates = pl_module.level_scheduler.updates
        pl_module.log_dict({f"levels/{name}/updates": float(n) for name, n in updates.items()})


class History(L.Callback):
    """Keeps the loss of every optimizer step and every validation, for summary.json and the loss-curve plot.

    Its state is saved in checkpoints, so a resumed run's history is the uninterrupted one.
    """

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []  # (optimizer step, loss)
        self.val: list[tuple[int, float, float]] = []  # (optimizer step, loss, perplexity)
        self._accum: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("global_loss", outputs["loss"]) if isinstance(outputs, dict) else outputs
        self._accum.append(float(loss.detach()))
        if _accumulating(trainer):
            return
        self.train.append((trainer.global_step, sum(self._accum) / len(self._accum)))
        self._accum = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val/loss" in m:
            self.val.append((trainer.global_step, float(m["val/loss"]), float(m["val/ppl"])))

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train = [tuple(x) for x in state.get("train", [])]
        self.val = [tuple(x) for x in state.get("val", [])]


class Preemption(L.Callback):
    """Checkpoints that do not wait for validation, and a clean stop on a signal.

    ``last.ckpt`` is written (atomically, like every checkpoint) every ``every_steps`` optimizer steps and every
    ``every_minutes`` minutes of training, so a preempted job loses at most that much. SIGTERM and SIGUSR1 (what
    SLURM and most schedulers send before they kill a job; ``#SBATCH --signal=USR1@90``) and Ctrl-C (SIGINT) ask for
    a stop: the step in flight finishes, ``last.ckpt`` is written, training ends, and ``stopped_by`` names the signal.
    Every rank decides together (one all-reduce of the request per step), so ranks that got the signal at different
    moments stop at the same step. A second Ctrl-C stops at once, without saving.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, ckpt_path: Path, every_steps: int = 0, every_minutes: float = 0.0) -> None:
        self.ckpt_path = ckpt_path
        self.every_steps = every_steps
        self.every_seconds = 60.0 * every_minutes
        self.requested: str | None = None
        self.stopped_by: str | None = None
        self._last_save = time.monotonic()
        self._previous: dict[int, Any] = {}

    def _request(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.requested == "SIGINT":
            os._exit(130)  # a second Ctrl-C: stop now
        self.requested = name
        if name == "SIGINT":
            print(
                "\nCtrl-C: saving last.ckpt after this step and stopping (Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_save = time.monotonic()
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._request)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _accumulating(trainer):
            return
        step = trainer.global_step
        timed = bool(self.every_seconds) and time.monotonic() - self._last_save >= self.every_seconds
        # one decision for all ranks: a signal or a clock that reached one rank stops or saves every rank at this step
        flags = torch.tensor([self.requested is not None, timed], dtype=torch.float32, device=pl_module.device)
        stop, timed = (bool(v) for v in trainer.strategy.reduce(flags, reduce_op="max").tolist())
        due = timed or (self.every_steps > 0 and step % self.every_steps == 0)
        if stop or due:
            trainer.save_checkpoint(self.ckpt_path)
            self._last_save = time.monotonic()
        if stop:
            self.stopped_by = self.requested or "a signal on another rank"
            trainer.should_stop = True


class FinalValidation(L.Callback):
    """Makes sure a validation (and so a checkpoint) runs at ``max_steps`` even when it is not a multiple of the
    validation interval: asking the loop to stop at the last step makes Lightning validate before it ends."""

    def __init__(self, val_every_n_steps: int) -> None:
        self.every = val_every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _accumulating(trainer):
            return
        if trainer.global_step >= trainer.max_steps and trainer.global_step % self.every:
            trainer.should_stop = True


def process_layout(trainer) -> dict[str, Any]:
    """How a run is spread over processes and devices: the run's MLflow tags and part of its summary."""
    return {
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "devices_per_node": trainer.num_devices,
        "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
        "strategy": type(trainer.strategy).__name__.removesuffix("Strategy").lower(),
        "precision": str(trainer.precision),
    }


class RunTracking(L.Callback):
    """One MLflow run per training run, however many processes train it.

    Rank 0's logger creates (or reopens) the run; ``setup`` broadcasts its id to every rank, so each node can log
    into that same run: the local rank 0 of every node starts MLflow's system-metrics monitor (CPU, memory, disk,
    network, and utilisation and memory of each GPU when NVML sees them), prefixed ``system/node<i>/`` when the run
    spans several nodes. Rank 0 also tags the run with its world size, node count, devices and strategy.
    """

    def __init__(self, tracking_uri: str, every_s: float) -> None:
        self.tracking_uri = tracking_uri
        self.every_s = every_s
        self.run_id: str | None = None
        self._monitor = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        logger = trainer.logger
        mine = getattr(logger, "run_id", None) if trainer.is_global_zero and logger is not None else None
        self.run_id = trainer.strategy.broadcast(mine, src=0)
        if self.run_id is None:
            return
        if trainer.is_global_zero:
            for key, value in process_layout(trainer).items():  # through the logger's outbox: never blocks
                logger.experiment.set_tag(self.run_id, key, str(value))
        if self.every_s > 0 and trainer.local_rank == 0 and self._monitor is None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # start/stop chatter on every run

            node = f"node{trainer.node_rank}" if trainer.num_nodes > 1 else None
            self._monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.every_s,
                resume_logging=True,
                node_id=node,
                tracking_uri=self.tracking_uri,
            )
            self._monitor.start()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.finish()  # MLflow's monitor stops by itself, with a warning, when the store stops answering
            # MLflow's monitor publishes only after a whole sampling interval and gives up when a status query fails
            # (a busy sqlite store): one last sample at the end, so every run records its system metrics
            try:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as exc:  # a lost tracking server costs the sample, never the run
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                print(mask(f"warning: the last system-metrics sample was not logged: {reason}"), file=sys.stderr)


class TrialPruning(L.Callback):
    """A sweep trial's pruning: reports ``monitor`` to the Optuna ``trial`` after every validation, by optimizer step,
    and asks the run to stop when the study's pruner says so (the run then ends normally, with its summary and
    checkpoint; ``pruned_at`` holds the step).

    Under DDP only global rank 0 holds the trial (``trial`` is None on the other ranks): it reports and asks the
    pruner, and broadcasts the answer, so every rank stops at the same step or none does."""

    def __init__(self, trial, monitor: str) -> None:
        self.trial = trial
        self.monitor = monitor
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.pruned_at is not None:
            return
        prune = False
        if trainer.is_global_zero and self.trial is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                self.trial.report(float(value), step=trainer.global_step)
                finished = trainer.global_step >= trainer.max_steps  # a run that got to the end is not pruned
                prune = not finished and self.trial.should_prune()
        if trainer.world_size > 1:
            prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            self.pruned_at = trainer.global_step
            trainer.should_stop = True
