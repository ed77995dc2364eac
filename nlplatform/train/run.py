"""One training run: ``train(cfg)`` is what ``nlplatform train RECIPE`` and the sweeps call.

A run lives in ``<output_dir>/<experiment>/<run>/``:

    recipe.yaml        the resolved recipe (vocab size filled in), enough to reproduce the run
    run.json           run name, MLflow run id and tracking URI, start time, command line
    tokenizer.json     the trained/loaded tokenizer (absent for bytes)
    checkpoints/       last.ckpt + the best by val loss, written at every validation, atomically
    loss_curve.png     train and validation loss against tokens seen
    summary.json       the figures of the run (see ``SUMMARY_KEYS``)
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from nlplatform.config import RecipeConfig
from nlplatform.data import atomic_write_text
from nlplatform.errors import ConfigError, RunStopped, UserError
from nlplatform.models.base import flush_denormals
from nlplatform.recipe import recipe_from_dict, recipe_to_dict, recipe_to_yaml, resume_differences
from nlplatform.registry import check_model_format
from nlplatform.secrets import mask
from nlplatform.train import rendezvous, runs

SUMMARY_KEYS = (
    "model",
    "preset",
    "params",
    "tokens_seen",
    "steps",
    "train_loss",
    "val_loss",
    "val_ppl",
    "unigram_ppl",
    "tokens_per_sec",
    "wall_s",
    "mlflow_run_id",
)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


class _DropAdverts(logging.Filter):
    """Lightning advertises a cloud logger on every run; the platform's output stays about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def _quiet_lightning() -> None:
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in logger.filters):
        logger.addFilter(_DropAdverts())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def is_rank_zero() -> bool:
    """True in the process that writes the run folder: global rank 0 of a multi-process launch, or a plain process.

    torchrun sets ``RANK`` and srun ``SLURM_PROCID`` (the global rank); Lightning's own launcher sets ``LOCAL_RANK``
    and, on multi-node jobs started by hand, ``NODE_RANK``."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return int(os.environ.get("NODE_RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


# ------------------------------------------------------------------------------------------ run folder


def _experiment_dir(cfg: RecipeConfig) -> Path:
    return Path(cfg.output_dir) / cfg.tracking.experiment


def _check_writable(folder: Path) -> None:
    """``folder`` can be created: its nearest existing ancestor is a folder that takes a new folder. Checked before
    anything of the run is written, so an unusable ``output_dir`` is one line, not a traceback half-way. The probe
    (a folder made and at once removed) also catches what permission bits do not: a read-only or pseudo file system,
    and root; nothing is left behind."""
    probe = folder.absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=probe))
    except OSError as exc:
        raise UserError(f"output_dir: cannot create {folder.parent}: {probe}: {exc.strerror or exc}") from None


# Lightning's ddp launcher starts ranks 1.. as child processes of rank 0 with the same command line; rank 0 decides the
# run folder and the checkpoint once and hands them to its children through the environment, which they inherit.
# Only a child of the process that wrote it trusts the value, not anything launched later by a process that once
# trained. Launchers that start every process at once (torchrun, srun) share rank 0's decision through a rendezvous.
_RUN_ENV = "NLPLATFORM_RUN"


@dataclass
class Resolved:
    """Where a run trains and from what: decided once, before the data step or the model."""

    run_dir: Path
    ckpt: Path | None  # the checkpoint to resume from (None: a fresh start)
    new: bool  # the folder was reserved by this call (a new run or a fork): removed again if the run never starts
    forked_from: Path | None = None  # a checkpoint other than the run's last.ckpt, continued in a new folder
    created: Path | None = None  # the outermost folder the reservation created (removed with it if never started)
    peers: rendezvous.Peers | None = None  # the launch's processes, when they started at once (torchrun, srun)


def resolve_run(cfg: RecipeConfig) -> Resolved:
    """The run folder (reserved or locked by rank 0) and the checkpoint to resume from, decided once by global rank 0
    and shared with every other rank before the Trainer exists (``rendezvous``): through the environment for the
    ranks Lightning's launcher starts, through a store for torchrun and srun, where every rank also checks that it
    sees the run folder rank 0 wrote (a ``runs/`` that is not shared across nodes is refused)."""
    group = rendezvous.peers(cfg.trainer.num_nodes)  # first: a launcher's ranks never take a value they inherited
    if group is not None:
        resolved = _agree(group, cfg)
        resolved.peers = group
    else:
        shared = json.loads(os.environ.get(_RUN_ENV, "{}"))
        if not is_rank_zero() and shared.get("pid") == os.getppid():
            ckpt = Path(shared["ckpt"]) if shared["ckpt"] else None
            return Resolved(Path(shared["run_dir"]), ckpt, new=False)
        resolved = _resolve_run(cfg)
    value = {
        "pid": os.getpid(),
        "run_dir": str(resolved.run_dir),
        "ckpt": str(resolved.ckpt) if resolved.ckpt else None,
    }
    os.environ[_RUN_ENV] = json.dumps(value)
    return resolved


_MARKER = ".rendezvous-"  # a file rank 0 writes in the run folder for the other ranks to find


def _agree(group: rendezvous.Peers, cfg: RecipeConfig) -> Resolved:
    mine: dict[str, Resolved] = {}

    def decide() -> dict:
        resolved = mine["run"] = _resolve_run(cfg)
        marker = resolved.run_dir / f"{_MARKER}{uuid.uuid4().hex}"
        marker.touch()
        return {
            "run_dir": str(resolved.run_dir),
            "ckpt": str(resolved.ckpt) if resolved.ckpt else None,
            "forked_from": str(resolved.forked_from) if resolved.forked_from else None,
            "marker": marker.name,
        }

    def check(decision: dict) -> str | None:
        if (Path(decision["run_dir"]) / decision["marker"]).exists():
            return None
        return (
            f"cannot see the run folder {decision['run_dir']} that rank 0 wrote; output_dir must be one file "
            "system every node mounts at the same path"
        )

    try:
        decision = group.agree("run", decide, check)
    except UserError:
        if "run" in mine:  # rank 0 reserved or locked a folder the launch will not use
            run = mine["run"]
            for marker in run.run_dir.glob(f"{_MARKER}*"):
                marker.unlink(missing_ok=True)
            if run.new:
                runs.abandon(run.run_dir, run.created)
            else:
                runs.release(run.run_dir)
        raise
    if group.rank == 0:
        (mine["run"].run_dir / decision["marker"]).unlink(missing_ok=True)
        return mine["run"]
    forked = Path(decision["forked_from"]) if decision["forked_from"] else None
    return Resolved(
        Path(decision["run_dir"]), Path(decision["ckpt"]) if decision["ckpt"] else None, new=False, forked_from=forked
    )


def _default_name(cfg: RecipeConfig) -> str:
    return f"{cfg.model.name}-{cfg.model.preset}-{datetime.now():%Y%m%d-%H%M%S}"


def _new_run(
    cfg: RecipeConfig, name: str | None, forked_from: Path | None = None, default: str | None = None
) -> Resolved:
    """A new run folder: ``name`` (tracking.run_name: refused when taken) or ``default`` / a timestamped name (a
    suffix added when taken)."""
    explicit = name is not None
    name = name or default or _default_name(cfg)
    run_dir = _experiment_dir(cfg) / name
    _check_writable(run_dir)
    run_dir, created = runs.reserve(_experiment_dir(cfg), name, explicit=explicit)
    return Resolved(run_dir, forked_from, new=True, forked_from=forked_from, created=created)


def _continue(run_dir: Path, ckpt: Path) -> Resolved:
    runs.acquire(run_dir)
    runs.clean(run_dir)
    return Resolved(run_dir, ckpt, new=False)


def _resolve_auto(cfg: RecipeConfig) -> Resolved:
    """``trainer.resume=auto``: the named run, or the newest unfinished run of this family and preset that is not
    running now; a new run when there is none."""
    root, name = _experiment_dir(cfg), cfg.tracking.run_name
    if name:
        run_dir = (root / name).absolute()
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            print(f"trainer.resume=auto: run {name} has no checkpoint yet; starting it", file=sys.stderr)
            if run_dir.is_dir() and any(run_dir.iterdir()):  # stopped before its first checkpoint
                runs.acquire(run_dir)
                return Resolved(run_dir.resolve(), None, new=False)
            return _new_run(cfg, name)
        if runs.finished(run_dir):
            raise UserError(
                f"trainer.resume=auto: run {run_dir} finished; auto never reopens a finished run. To train it "
                f"further, pass trainer.resume={ckpt} with a larger trainer.max_steps; for a new run, pick another "
                "tracking.run_name"
            )
        print(f"trainer.resume=auto: continuing run {name}", file=sys.stderr)
        return _continue(run_dir.resolve(), ckpt)
    found = runs.auto_candidates(root, cfg.model.name, cfg.model.preset)
    for cand in found:
        if cand.state == "unfinished":
            try:
                resolved = _continue(cand.run_dir, cand.ckpt)
            except UserError:  # locked by a run that started a moment ago: not ours to continue
                continue
            print(
                f"trainer.resume=auto: continuing the newest unfinished {cfg.model.name}/{cfg.model.preset} run, "
                f"{cand.run_dir}",
                file=sys.stderr,
            )
            return resolved
    skipped = ", ".join(f"{sum(c.state == s for c in found)} {s}" for s in ("finished", "running"))
    print(
        f"trainer.resume=auto: no unfinished {cfg.model.name}/{cfg.model.preset} run to continue in {root} "
        f"({skipped}); starting a new run",
        file=sys.stderr,
    )
    return _new_run(cfg, None)


def _resolve_run(cfg: RecipeConfig) -> Resolved:
    resume = cfg.trainer.resume
    if resume == "auto":
        return _resolve_auto(cfg)
    if not resume:
        return _new_run(cfg, cfg.tracking.run_name)
    ckpt = Path(resume)
    if not ckpt.is_file():
        raise UserError(f"trainer.resume: checkpoint not found: {ckpt}")
    ckpt = ckpt.absolute()
    run_dir = ckpt.parent.parent
    if ckpt.name == "last.ckpt" and ckpt.parent.name == "checkpoints" and (run_dir / "recipe.yaml").is_file():
        return _continue(run_dir.resolve(), ckpt)
    # any other checkpoint (a best one, a copied file) starts a new run from it: its own run folder keeps its last.ckpt
    from nlplatform.checkpoint import read_checkpoint

    step = int(read_checkpoint(ckpt, mmap=True).get("global_step", 0))
    source = run_dir.name if ckpt.parent.name == "checkpoints" else ckpt.stem
    return _new_run(cfg, cfg.tracking.run_name, forked_from=ckpt, default=runs.fork_name(source, step))


def _prepare_data(data, peers: rendezvous.Peers | None) -> None:
    """Build the token cache once: by this process, or, when the launch's processes started at once, by global rank 0
    while the others wait; every rank then checks it sees the cache (one file system for ``NLPLATFORM_CACHE``)."""
    if peers is None:
        data.prepare_data()
        return

    def prepare() -> dict:
        data.prepare_data()
        return {"folder": str(data.data_dir().absolute())}

    def check(decision: dict) -> str | None:
        if (Path(decision["folder"]) / "meta.json").is_file():
            return None
        return (
            f"cannot see the token cache {decision['folder']} that rank 0 built; NLPLATFORM_CACHE must be one "
            "file system every node mounts at the same path"
        )

    peers.agree("data", prepare, check)


def _check_resume(ckpt: Path, cfg: RecipeConfig) -> dict[str, Any]:
    """Refuse a checkpoint whose recipe differs from ``cfg`` in any key the schema does not let change on resume
    (``nlplatform.config.RESUMABLE``), with the differences, before Lightning loads anything of it."""
    from nlplatform.checkpoint import read_checkpoint

    state = read_checkpoint(ckpt, mmap=True)
    saved = state["hyper_parameters"]["recipe"]
    old = saved.get("model", {})
    if old.get("name") != cfg.model.name:
        raise UserError(
            f"checkpoint {ckpt} holds a {old.get('name')}/{old.get('preset')} model, but this recipe trains "
            f"{cfg.model.name}/{cfg.model.preset}; resume it with its own recipe ({ckpt.parent.parent / 'recipe.yaml'})"
        )
    check_model_format(cfg.model.name, state.get("model_format"), f"checkpoint {ckpt}")
    diff = resume_differences(saved, cfg)
    if diff:
        raise UserError(
            f"checkpoint {ckpt} was trained with another recipe ({'; '.join(diff)}); only "
            "trainer.max_steps, devices, nodes, logging and tracking names may change on resume (and the batch "
            "and accumulation at equal tokens per step). Resume with the run's own recipe.yaml, or start a new run"
        )
    return state


def _check_layout(ckpt: Path, state: dict[str, Any], cfg: RecipeConfig, world_size: int) -> None:
    """A resume keeps the tokens per optimizer step of the checkpoint: level periods, the schedule and the data
    position are all counted in them. Another world size is fine when batch x accumulation make up for it."""
    from nlplatform.train.module import tokens_per_step

    saved = state.get("layout")
    if not saved:
        return  # written before checkpoints recorded it: the level scheduler still compares its periods
    now = tokens_per_step(cfg, world_size)
    if now != saved["tokens_per_step"]:
        raise UserError(
            f"checkpoint {ckpt} was trained at {saved['tokens_per_step']:,} tokens per optimizer step "
            f"(world size {saved['world_size']}, batch {saved['batch_size']}, accumulation {saved['accumulate']}); "
            f"this run would take {now:,} (world size {world_size}, batch {cfg.data.batch_size}, accumulation "
            f"{cfg.trainer.accumulate_grad_batches}). Level periods and the data position are counted in tokens per "
            "step: set data.batch_size or trainer.accumulate_grad_batches so that they match"
        )


# ------------------------------------------------------------------------------------------------ run


def _precision(cfg: RecipeConfig) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    use_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if use_gpu and torch.cuda.is_bf16_supported() else "32-true"


def build_trainer(cfg: RecipeConfig, run_dir: Path, logger, callbacks: list):
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ModelCheckpoint

    from nlplatform.train.callbacks import AtomicCheckpointIO

    t = cfg.trainer
    acc = t.accumulate_grad_batches
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step:06d}-val{val/loss:.4f}",
        auto_insert_metric_name=False,
        monitor="val/loss",
        mode="min",
        save_top_k=t.save_top_k,
        save_last=True,
        # last.ckpt is always this run's latest state: never "last-v1.ckpt" beside a last.ckpt that a moved or copied
        # run folder brought along (auto would continue the stale one)
        enable_version_counter=False,
    )
    try:
        return L.Trainer(
            max_steps=t.max_steps,
            val_check_interval=t.val_check_interval * acc,  # Lightning counts micro-batches; the recipe counts steps
            check_val_every_n_epoch=None,
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=t.strategy,
            precision=_precision(cfg),
            accumulate_grad_batches=acc,
            gradient_clip_val=None,  # LMModule clips each step's gradient before the level scheduler (levels.py)
            log_every_n_steps=t.log_every_n_steps,
            logger=logger if logger is not None else False,
            callbacks=[checkpoint, *callbacks],
            plugins=[AtomicCheckpointIO()],
            enable_progress_bar=t.enable_progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            deterministic=t.deterministic,
            use_distributed_sampler=False,  # the DataModule shards by rank itself (resumable, deterministic)
            default_root_dir=run_dir,
        )
    except (MisconfigurationException, ValueError) as exc:  # Lightning's own checks of its arguments
        raise ConfigError(f"trainer settings rejected: {str(exc).splitlines()[0]}") from None


def train(cfg: RecipeConfig, *, callbacks: tuple = (), tags: dict[str, str] | None = None) -> RunResult:
    """Train ``cfg``; return the run folder and its summary. Raises UserError on bad input. ``callbacks`` join the
    Trainer's; ``tags`` are set on a new MLflow run (a sweep nests its trials with ``mlflow.parentRunId``).

    The run folder is reserved (a new run) or locked (a resumed one) first; however the run ends, its lock goes, and a
    folder reserved for a run that never started (bad input found later) goes too."""
    t_start = time.time()
    _quiet_lightning()
    flush_denormals()  # before the data step starts torch's worker threads
    resolved = resolve_run(cfg)
    try:
        return _train(cfg, resolved, callbacks, tags, t_start)
    finally:
        if resolved.new and not (resolved.run_dir / "recipe.yaml").exists():
            runs.abandon(resolved.run_dir, resolved.created)
        else:
            runs.release(resolved.run_dir)


def _train(cfg: RecipeConfig, resolved: Resolved, callbacks: tuple, tags: dict[str, str] | None, t_start: float):
    import lightning as L

    from nlplatform import tracking
    from nlplatform.data.datamodule import TextDataModule
    from nlplatform.train.callbacks import (
        FinalValidation,
        History,
        LevelMonitor,
        Preemption,
        RunTracking,
        Throughput,
    )
    from nlplatform.train.module import LMModule

    run_dir, ckpt = resolved.run_dir, resolved.ckpt
    continuing = ckpt is not None and resolved.forked_from is None  # the same run goes on (not a fork)
    data = TextDataModule(cfg.data, seed=cfg.seed)
    _prepare_data(data, resolved.peers)
    data.setup("fit")
    vocab = data.vocab_size
    if cfg.model.vocab_size is None:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} ids")
    cfg = recipe_from_dict(recipe_to_dict(cfg))  # re-validate the filled-in recipe

    run_meta: dict[str, Any] = {}
    resume_step, state = 0, None
    if ckpt is not None:
        state = _check_resume(ckpt, cfg)
        resume_step = int(state.get("global_step", 0))
        if continuing:
            run_meta = runs.read_meta(run_dir)
            if runs.finished(run_dir) and resume_step >= cfg.trainer.max_steps:
                raise UserError(
                    f"run {run_dir} finished at step {resume_step}; to train it further raise trainer.max_steps "
                    f"above {resume_step}"
                )
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Everything that can still reject the recipe (model sizes, Lightning's trainer arguments) runs before the run
    # folder is written, so bad input leaves nothing behind.
    run_name = run_dir.name
    logger = tracking.make_logger(cfg, run_name, run_id=run_meta.get("mlflow_run_id"), tags=tags)
    throughput = Throughput(cfg.data.seq_len, cfg.trainer.log_every_n_steps)
    history = History()
    extra = [throughput, history, LevelMonitor(cfg.trainer.log_every_n_steps, log_params=not continuing)]
    t = cfg.trainer
    preemption = Preemption(run_dir / "checkpoints" / "last.ckpt", t.checkpoint_every_steps, t.checkpoint_every_minutes)
    extra += [FinalValidation(t.val_check_interval), preemption, *callbacks]
    if logger is not None:
        extra.append(
            RunTracking(tracking.absolute_uri(tracking.tracking_uri(cfg)), cfg.tracking.system_metrics_every_s)
        )
    trainer = build_trainer(cfg, run_dir, logger, extra)
    if state is not None:
        _check_layout(ckpt, state, cfg, trainer.world_size)
    module = LMModule(recipe_to_dict(cfg, masked=True))  # its hyperparameters travel in every checkpoint
    if ckpt is None and getattr(cfg.model, "stack_from", None):
        from nlplatform.checkpoint import load_checkpoint

        source = load_checkpoint(cfg.model.stack_from).model.state_dict()
        copied = module.model.stack_levels(source)
        print(f"stacked levels from {cfg.model.stack_from}: {len(copied)} tensors copied", file=sys.stderr)

    if is_rank_zero():
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if continuing:  # the run's recipe and tokenizer stay as they were written; run.json records the resume
            module.hparams["tokenizer"] = state["hyper_parameters"].get("tokenizer", "bytes")
            run_meta.setdefault("resumes", []).append(
                {"step": resume_step, "checkpoint": str(ckpt), "time": now, "command": mask(shlex.join(sys.argv))}
            )
            run_meta["finished"] = None
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "recipe.yaml", recipe_to_yaml(cfg))
            module.hparams["tokenizer"] = data.tokenizer.save(run_dir)  # travels in every checkpoint
            run_meta = {"run_name": run_name, "started": now, "command": mask(shlex.join(sys.argv)), "finished": None}
            if resolved.forked_from is not None:
                run_meta["forked_from"] = {"checkpoint": str(resolved.forked_from), "step": resume_step}
        if logger is not None:
            run_meta["mlflow_run_id"] = logger.run_id
            run_meta["tracking_uri"] = mask(tracking.absolute_uri(tracking.tracking_uri(cfg)))
            if not continuing:
                logger.log_hyperparams(tracking.recipe_params(cfg))
        runs.write_meta(run_dir, run_meta)
        print(f"optimizer {cfg.optim.name}, peak learning rate {cfg.optim.lr:g}", file=sys.stderr)
        if ckpt is not None:
            what = "forking a new run" if resolved.forked_from is not None else "resuming"
            print(f"{what} from {ckpt.resolve()} at step {resume_step}", file=sys.stderr)
            if resume_step >= cfg.trainer.max_steps:
                print(
                    f"the run already reached trainer.max_steps={cfg.trainer.max_steps}; raise it to train further",
                    file=sys.stderr,
                )

    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    if preemption.stopped_by is not None:
        raise _stopped(preemption.stopped_by, trainer.global_step, run_dir / "checkpoints" / "last.ckpt", logger)

    # Ranks on other nodes decided nothing themselves: the run folder and the MLflow run are rank 0's.
    run_dir = Path(trainer.strategy.broadcast(str(run_dir), src=0))
    run_id = trainer.strategy.broadcast(run_meta.get("mlflow_run_id"), src=0)
    unigram = data.unigram_perplexity()
    summary = _summary(cfg, module, trainer, unigram, throughput, history, t_start, run_id)
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        tps = module.level_scheduler.tokens_per_step
        plot = _plot_loss_curve(history, tps, unigram, run_dir / "loss_curve.png", run_name)
        if logger is not None:
            logger.log_metrics(tracking.summary_metrics(summary), step=trainer.global_step)
            tracking.log_artifacts(logger, [run_dir / "recipe.yaml", run_dir / "summary.json", plot])
            logger.finalize("success")
            _warn_tracking(logger)
        runs.mark_finished(run_dir)
    return RunResult(run_dir=run_dir, summary=summary)


def _warn_tracking(logger) -> None:
    """Say what of the run did not reach MLflow (a tracking server that went away): the run itself is complete."""
    problem = logger.problem()
    if problem:
        print(f"warning: {problem}", file=sys.stderr)


def _stopped(signal_name: str, step: int, last: Path, logger) -> RunStopped:
    """What training that stopped on a signal says (and, for SLURM's SIGUSR1 on rank 0, the job it requeued)."""
    import signal
    import subprocess

    if logger is not None:
        logger.finalize("killed")
        _warn_tracking(logger)
    code = 128 + int(getattr(signal, signal_name, signal.SIGTERM))
    args = [a for a in sys.argv[1:] if not a.startswith("trainer.resume=")]
    command = "nlplatform " + shlex.join([*args, f"trainer.resume={last}"]) if args[:1] == ["train"] else None
    lines = [f"stopped by {signal_name} at step {step}; {last} saved"]
    job = os.environ.get("SLURM_JOB_ID")
    if signal_name == "SIGUSR1" and job and is_rank_zero():
        try:  # SLURM's warning before a time limit or a preemption: put the job back in the queue
            subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
            lines.append(f"requeued SLURM job {job}: it continues with trainer.resume=auto or {last}")
        except (OSError, subprocess.SubprocessError) as exc:
            lines.append(f"could not requeue SLURM job {job} ({exc})")
    lines.append(f"continue with: {command}" if command else f"continue with trainer.resume={last}")
    return RunStopped("\n".join(lines), 130 if signal_name == "SIGINT" else code)


def _summary(cfg, module, trainer, unigram_ppl, throughput, history, t_start, run_id) -> dict[str, Any]:
    from nlplatform.train.callbacks import process_layout

    last_val = history.val[-1] if history.val else (trainer.global_step, float("nan"), float("nan"))
    tail = [loss for _, loss in history.train[-cfg.trainer.log_every_n_steps :]]
    params = sum(p.numel() for p in module.model.parameters())
    return {
        "model": cfg.model.name,
        "preset": cfg.model.preset,
        "params": params,
        "tokens_seen": trainer.global_step * module.level_scheduler.tokens_per_step,
        "steps": trainer.global_step,
        "train_loss": sum(tail) / len(tail) if tail else None,
        "val_loss": last_val[1],
        "val_ppl": last_val[2],
        "unigram_ppl": unigram_ppl,
        "tokens_per_sec": throughput.tokens_per_sec,
        "wall_s": time.time() - t_start,
        "mlflow_run_id": run_id,
        **process_layout(trainer),
        "levels": module.level_table(),
    }


def _plot_loss_curve(history, tokens_per_step: int, unigram_ppl: float, path: Path, title: str) -> Path:
    """Train loss (raw and smoothed) and validation loss against tokens seen, with the unigram baseline."""
    import math

    from nlplatform.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if history.train:
        steps, losses = zip(*history.train)
        tokens = [s * tokens_per_step for s in steps]
        ax.plot(tokens, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
        smooth, ema = [], losses[0]
        for loss in losses:
            ema = 0.9 * ema + 0.1 * loss
            smooth.append(ema)
        ax.plot(tokens, smooth, color="tab:blue", linewidth=1.5, label="train (EMA 0.9)")
    if history.val:
        steps, losses, _ = zip(*history.val)
        ax.plot([s * tokens_per_step for s in steps], losses, "o-", color="tab:orange", label="validation")
    ax.axhline(math.log(unigram_ppl), color="gray", linestyle="--", linewidth=1, label="unigram baseline")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
