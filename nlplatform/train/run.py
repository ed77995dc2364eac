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
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from nlplatform.config import RecipeConfig, recipe_from_dict, recipe_to_dict, recipe_to_yaml
from nlplatform.data import atomic_write_text
from nlplatform.errors import ConfigError, UserError
from nlplatform.models.base import flush_denormals
from nlplatform.registry import check_model_format

SUMMARY_KEYS = (
    "model", "preset", "params", "tokens_seen", "steps", "train_loss", "val_loss", "val_ppl", "unigram_ppl",
    "tokens_per_sec", "wall_s", "mlflow_run_id",
)  # fmt: skip


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


def _find_auto_resume(cfg: RecipeConfig) -> Path | None:
    """The newest run of this experiment with the same model family and preset that has a last checkpoint."""
    root = _experiment_dir(cfg)
    if cfg.tracking.run_name:
        ckpt = root / cfg.tracking.run_name / "checkpoints" / "last.ckpt"
        return ckpt if ckpt.exists() else None
    candidates = []
    for ckpt in root.glob("*/checkpoints/last.ckpt"):
        recipe = ckpt.parent.parent / "recipe.yaml"
        if not recipe.exists():
            continue
        saved = OmegaConf.load(recipe)
        if saved.model.name == cfg.model.name and saved.model.preset == cfg.model.preset:
            candidates.append(ckpt)
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


# Lightning's ddp launcher starts ranks 1.. as child processes of rank 0 with the same command line; rank 0 decides the
# run folder and the checkpoint once and hands them to its children through the environment, which they inherit.
# Only a child of the process that wrote it trusts the value: ranks started by torchrun or srun are not (they get rank
# 0's choice by broadcast once training starts), nor is anything launched later by a process that once trained.
_RUN_ENV = "NLPLATFORM_RUN"


def resolve_run(cfg: RecipeConfig) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from or None), decided once by rank 0 and shared with the other ranks."""
    shared = json.loads(os.environ.get(_RUN_ENV, "{}"))
    if not is_rank_zero() and shared.get("pid") == os.getppid():
        return Path(shared["run_dir"]), Path(shared["ckpt"]) if shared["ckpt"] else None
    run_dir, ckpt = _resolve_run(cfg)
    value = {"pid": os.getpid(), "run_dir": str(run_dir), "ckpt": str(ckpt) if ckpt else None}
    os.environ[_RUN_ENV] = json.dumps(value)
    return run_dir, ckpt


def _resolve_run(cfg: RecipeConfig) -> tuple[Path, Path | None]:
    resume = cfg.trainer.resume
    ckpt: Path | None = None
    if resume == "auto":
        ckpt = _find_auto_resume(cfg)
        if ckpt is None and is_rank_zero():
            print("trainer.resume=auto: no earlier checkpoint of this recipe; starting a new run", file=sys.stderr)
    elif resume:
        ckpt = Path(resume)
        if not ckpt.is_file():
            raise UserError(f"trainer.resume: checkpoint not found: {ckpt}")
    if ckpt is not None:
        run_dir = ckpt.resolve().parent.parent if ckpt.parent.name == "checkpoints" else ckpt.resolve().parent
        return run_dir, ckpt
    name = cfg.tracking.run_name or f"{cfg.model.name}-{cfg.model.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = _experiment_dir(cfg) / name
    _check_writable(run_dir)
    # Only rank 0 writes the folder; under torchrun or srun the other ranks start on their own and may find rank 0's
    # folder already there (their choice is replaced by rank 0's once training starts).
    if is_rank_zero() and run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(
            f"run folder {run_dir} already exists; pick another tracking.run_name or continue it with "
            "trainer.resume=auto"
        )
    return run_dir.resolve(), None


def _check_resume_compatible(ckpt: Path, cfg: RecipeConfig) -> dict[str, Any]:
    """Refuse a checkpoint of another model (family, preset or sizes) before Lightning tries to load its weights."""
    from nlplatform.checkpoint import read_checkpoint

    state = read_checkpoint(ckpt, mmap=True)
    saved = state["hyper_parameters"]["recipe"]
    old, new = saved["model"], recipe_to_dict(cfg)["model"]
    if old.get("name") != new["name"]:
        raise UserError(
            f"checkpoint {ckpt} holds a {old.get('name')}/{old.get('preset')} model, but this recipe trains "
            f"{new['name']}/{new['preset']}; resume it with its own recipe ({ckpt.parent.parent / 'recipe.yaml'})"
        )
    check_model_format(new["name"], state.get("model_format"), f"checkpoint {ckpt}")
    diff = {k: (old.get(k), v) for k, v in new.items() if k != "vocab_size" and old.get(k) != v}
    if new["vocab_size"] is not None and old.get("vocab_size") != new["vocab_size"]:
        diff["vocab_size"] = (old.get("vocab_size"), new["vocab_size"])
    if diff:
        shown = ", ".join(f"model.{k}: checkpoint {a!r} vs recipe {b!r}" for k, (a, b) in diff.items())
        raise UserError(f"checkpoint {ckpt} was trained with a different model ({shown})")
    return state


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
    Trainer's; ``tags`` are set on a new MLflow run (a sweep nests its trials with ``mlflow.parentRunId``)."""
    import lightning as L

    from nlplatform import tracking
    from nlplatform.data import TextDataModule
    from nlplatform.train.callbacks import FinalValidation, History, LevelMonitor, RunTracking, Throughput
    from nlplatform.train.module import LMModule

    t_start = time.time()
    _quiet_lightning()
    flush_denormals()  # before the data step starts torch's worker threads
    run_dir, ckpt = resolve_run(cfg)

    data = TextDataModule(cfg.data, seed=cfg.seed)
    data.prepare_data()
    data.setup("fit")
    vocab = data.vocab_size
    if cfg.model.vocab_size is None:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
    if getattr(cfg.model, "context_len", cfg.data.seq_len) != cfg.data.seq_len:
        # families with in-context levels classify them against the training window (in-context iff C < window)
        cfg = replace(cfg, model=replace(cfg.model, context_len=cfg.data.seq_len))
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab} ids")
    cfg = recipe_from_dict(recipe_to_dict(cfg))  # re-validate the filled-in recipe

    run_meta: dict[str, Any] = {}
    resume_step = 0
    if ckpt is not None:
        resume_step = int(_check_resume_compatible(ckpt, cfg).get("global_step", 0))
        if (run_dir / "run.json").exists():
            run_meta = json.loads((run_dir / "run.json").read_text())
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Everything that can still reject the recipe (model sizes, Lightning's trainer arguments) runs before the run
    # folder is written, so bad input leaves nothing behind.
    run_name = run_dir.name
    logger = tracking.make_logger(cfg, run_name, run_id=run_meta.get("mlflow_run_id"), tags=tags)
    throughput = Throughput(cfg.data.seq_len, cfg.trainer.log_every_n_steps)
    history = History()
    extra = [throughput, history, LevelMonitor(cfg.trainer.log_every_n_steps, log_params=ckpt is None)]
    extra += [FinalValidation(cfg.trainer.val_check_interval), *callbacks]
    if logger is not None:
        extra.append(
            RunTracking(tracking.absolute_uri(tracking.tracking_uri(cfg)), cfg.tracking.system_metrics_every_s)
        )
    trainer = build_trainer(cfg, run_dir, logger, extra)
    module = LMModule(recipe_to_dict(cfg))
    if ckpt is None and getattr(cfg.model, "stack_from", None):
        from nlplatform.checkpoint import load_checkpoint

        source = load_checkpoint(cfg.model.stack_from).model.state_dict()
        copied = module.model.stack_levels(source)
        print(f"stacked levels from {cfg.model.stack_from}: {len(copied)} tensors copied", file=sys.stderr)

    rank_zero = is_rank_zero()
    if rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", recipe_to_yaml(cfg))
        module.hparams["tokenizer"] = data.tokenizer.save(run_dir)  # travels in every checkpoint
        if logger is not None:
            run_meta["mlflow_run_id"] = logger.run_id
            run_meta["tracking_uri"] = tracking.absolute_uri(tracking.tracking_uri(cfg))
            if ckpt is None:
                logger.log_hyperparams(tracking.recipe_params(cfg))
        run_meta.setdefault("run_name", run_name)
        run_meta.setdefault("started", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        run_meta.setdefault("command", shlex.join(sys.argv))
        atomic_write_text(run_dir / "run.json", json.dumps(run_meta, indent=2) + "\n")
        if ckpt is not None:
            print(f"resuming from {ckpt.resolve()} at step {resume_step}", file=sys.stderr)
            if resume_step >= cfg.trainer.max_steps:
                print(
                    f"the run already reached trainer.max_steps={cfg.trainer.max_steps}; raise it to train further",
                    file=sys.stderr,
                )

    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)

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
    return RunResult(run_dir=run_dir, summary=summary)


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
