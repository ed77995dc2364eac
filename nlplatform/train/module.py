"""The one LightningModule every model family trains with.

It owns the next-token loss, the metrics, the optimizer with its schedule, and the outer loop of the nested levels:
Lightning keeps its automatic optimization (so gradient accumulation, clipping and data-parallel all-reduce work as
usual) and ``on_before_optimizer_step`` hands the finished gradients to the ``LevelScheduler``, which holds back the
gradients of persistent levels that are not due yet (Nested Learning arXiv §3.2-3.3, Eq. 71).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.text import Perplexity

from nlplatform.config import RecipeConfig
from nlplatform.errors import ConfigError, TrainingDiverged
from nlplatform.levels import LevelScheduler, check_levels
from nlplatform.optim import build_optimizer, level_param_groups
from nlplatform.recipe import recipe_from_dict
from nlplatform.registry import build_model, get_spec


def tokens_per_step(cfg: RecipeConfig, world_size: int) -> int:
    """T_step: global tokens per optimizer step (sequence length x batch x world size x accumulation)."""
    return cfg.data.seq_len * cfg.data.batch_size * world_size * cfg.trainer.accumulate_grad_batches


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing per block: each block of ``model.layers`` keeps only its input in forward and runs
    again in backward (torch's non-reentrant checkpoint wrapper, which also lets HOPE's in-context levels take
    their inner gradients inside the block). Parameters and state-dict keys are unchanged, so checkpoints move freely
    between runs with and without it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    blocks = {id(block) for block in model.layers}
    apply_activation_checkpointing(model, check_fn=lambda m: id(m) in blocks)


class LMModule(L.LightningModule):
    """Next-token language modelling for any registered family, with nested levels."""

    def __init__(self, recipe: dict[str, Any]) -> None:
        super().__init__()
        # The resolved recipe (vocab size filled in) travels inside every checkpoint, so a checkpoint alone rebuilds
        # its model (generate, eval) and a resume can refuse a checkpoint of another model. The run adds
        # hparams["tokenizer"] (the tokenizer's spec) once the tokenizer is saved in the run folder; a checkpoint
        # without it uses the byte tokenizer.
        self.save_hyperparameters({"recipe": recipe}, logger=False)
        self.cfg: RecipeConfig = recipe_from_dict(recipe, saved=True)
        self.model: nn.Module = build_model(self.cfg.model)
        if self.cfg.trainer.activation_checkpointing:
            checkpoint_blocks(self.model)
        self.val_ppl = Perplexity()
        self.level_scheduler: LevelScheduler | None = None
        self._pending_level_state: dict | None = None
        self.last_val_step = -1

    # ----------------------------------------------------------------------------------------------- set-up

    def setup(self, stage: str) -> None:
        levels = self.model.levels()
        try:
            check_levels(levels, self.model, self.cfg.data.seq_len)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.level_scheduler = LevelScheduler(levels, tokens_per_step(self.cfg, self.trainer.world_size))
        if self._pending_level_state is not None:
            self._load_level_state(self._pending_level_state)
            self._pending_level_state = None

    def _load_level_state(self, state: dict) -> None:
        try:
            self.level_scheduler.load_state_dict(state)
        except ValueError as exc:  # another tokens per step than the checkpoint's: refused, not run differently
            raise ConfigError(str(exc)) from None

    def level_table(self) -> list[dict]:
        assert self.level_scheduler is not None
        return self.level_scheduler.table(self.model.levels())

    def configure_optimizers(self):
        o = self.cfg.optim
        groups, adamw_only = level_param_groups(self.model, o)
        optimizer = build_optimizer(groups, o, adamw_only=adamw_only)
        total = self.cfg.trainer.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, warmup=o.warmup_steps, total=total, min_ratio=o.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------------------- steps

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        logits = self.model(inputs)  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return loss, logits, targets

    def training_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        loss, _, _ = self._loss(batch)
        # The mean over ranks, one all-reduce of a scalar: what is logged and kept is the global batch's loss whatever
        # the world size, and every rank sees a non-finite loss on any rank (so all stop together instead of one rank
        # stopping while the others wait in the next all-reduce).
        global_loss = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
        if not torch.isfinite(global_loss):
            raise TrainingDiverged(self._divergence_message(global_loss))
        self.log("train/loss", global_loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return {"loss": loss, "global_loss": global_loss}

    def _divergence_message(self, loss: torch.Tensor) -> str:
        step = self.trainer.global_step + 1
        ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or ""
        where = f"last good checkpoint: {ckpt}" if ckpt else "no checkpoint was written before it"
        return (
            f"training loss became {loss.item()} at optimizer step {step}; stopping. {where}. Lower optim.lr or "
            "raise optim.warmup_steps, then continue from that checkpoint with trainer.resume=PATH."
        )

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits, targets = self._loss(batch)
        self.val_ppl.update(logits.float(), targets)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log("val/ppl", self.val_ppl.compute(), prog_bar=True, sync_dist=True)
        self.val_ppl.reset()
        if not self.trainer.sanity_checking:
            self.last_val_step = self.trainer.global_step

    def test_step(self, batch, batch_idx: int) -> None:
        loss, _, _ = self._loss(batch)
        self.log("test/loss", loss, sync_dist=True)

    # -------------------------------------------------------------------------------------- nested levels

    def on_before_optimizer_step(self, optimizer) -> None:
        # Called after accumulation, the data-parallel all-reduce and AMP's unscaling, before the optimizer step.
        # Clipping happens here, before slow levels hold their gradients back (the Trainer clips nothing): a level's
        # released sum never shrinks another level's step (nlplatform/levels.py).
        assert self.level_scheduler is not None
        from lightning.pytorch.strategies import FSDPStrategy

        sharded = isinstance(self.trainer.strategy, FSDPStrategy)  # each rank holds a shard of the gradients
        self.level_scheduler.before_optimizer_step(
            self.trainer.global_step,
            self.cfg.trainer.gradient_clip_val or None,
            (lambda x: self.trainer.strategy.reduce(x, reduce_op="sum")) if sharded else None,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what the weights compute (registry.check_model_format refuses a checkpoint of another format)
        checkpoint["model_format"] = get_spec(self.cfg.model.name).format_version
        if self.level_scheduler is not None:
            checkpoint["level_scheduler"] = self.level_scheduler.state_dict()
        # what a resume must keep: level periods, the schedule and the data position are counted in tokens per step
        checkpoint["layout"] = {
            "tokens_per_step": tokens_per_step(self.cfg, self.trainer.world_size),
            "world_size": self.trainer.world_size,
            "seq_len": self.cfg.data.seq_len,
            "batch_size": self.cfg.data.batch_size,
            "accumulate": self.cfg.trainer.accumulate_grad_batches,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("level_scheduler")
        if state is None:
            return
        if self.level_scheduler is None:
            self._pending_level_state = state
        else:
            self._load_level_state(state)
