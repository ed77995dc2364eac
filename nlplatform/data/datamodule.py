"""The Lightning data module: corpus -> document split -> tokenizer -> packed token files -> DataLoaders.

Everything derived from the corpus is cached under ``<root>/tokens/<key>/`` where the key hashes the corpus
sources, the split settings and the tokenizer, so a second ``prepare_data`` is a single ``stat``. The folder is
built beside its final name and renamed into place: it exists complete (with ``meta.json``) or not at all.

Training batches come from an infinite ``ResumableSampler`` started at the number of windows all ranks together
have consumed, which checkpoints record: a run killed and resumed from a checkpoint sees exactly the batches the
uninterrupted run would have seen, with the same or any other number of ranks (the global stream does not depend on
the world size; rank r of W takes every W-th window of it). The module shards train, val and test data over ranks
itself, so in multi-device runs the Trainer must be built with ``use_distributed_sampler=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Subset

from nlplatform.config import DataConfig
from nlplatform.data import cache_root
from nlplatform.data.corpus import corpus_fingerprint
from nlplatform.data.packing import ResumableSampler, TokenWindows
from nlplatform.data.prepare import SPLITS
from nlplatform.data.shards import TokenShards, read_counts, read_index
from nlplatform.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_key
from nlplatform.errors import UserError
from nlplatform.files import atomic_write_text, clean_stale_temporaries, exclusive_lock, fsync_dir, make_staging_dir

# bump when the layout of the token folder changes, so old caches are not misread. 2: token shards with an index (the
# tokens themselves are those of format 1: the same split, tokenizer and packing)
FORMAT = 2


class TextDataModule(L.LightningDataModule):
    """Language-modelling data for one ``DataConfig``: windows of ``seq_len`` tokens predicting the next token.

    After ``setup()``: ``tokenizer``, ``vocab_size``, ``num_tokens`` (split -> tokens), ``fingerprint`` (the cache
    key, also saved in checkpoints) and ``tokenizer_spec`` (reloads the tokenizer with ``load_tokenizer``).
    """

    def __init__(self, cfg: DataConfig, seed: int, root: Path | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = int(seed)
        # Absolute, so a later chdir (or a spawned worker) still finds the cache.
        self.root = (Path(root) if root is not None else cache_root()).resolve()
        self.tokenizer: Tokenizer | None = None
        self.vocab_size: int | None = None
        self.num_tokens: dict[str, int] = {}
        self.num_documents: dict[str, int] = {}
        self.fingerprint: str | None = None
        self.tokenizer_spec: str | None = None
        self._loaded_state: dict[str, Any] | None = None
        # Training windows consumed by all ranks before optimizer step ``_base_step`` (from a resumed checkpoint): the
        # world size or batch may have been different then, so the count is carried rather than recomputed.
        self._base_consumed, self._base_step = 0, 0

    # ----------------------------------------------------------------------------------------- preparation

    def data_key(self) -> str:
        """The cache key of this configuration: corpus sources + split settings + tokenizer identity."""
        cfg = self.cfg
        parts = {
            "format": FORMAT,
            "corpus": corpus_fingerprint(cfg),
            "split": [cfg.val_fraction, cfg.test_fraction, cfg.split_seed],
            "tokenizer": tokenizer_key(cfg.tokenizer, cfg.bpe_vocab_size, cfg.tokenizer_sample_bytes),
        }
        if cfg.max_tokens is not None:  # absent otherwise: the key of a whole corpus does not change
            parts["max_tokens"] = cfg.max_tokens
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def data_dir(self) -> Path:
        """``<root>/tokens/<key>``: the token files, their sidecars, ``meta.json`` and ``tokenizer.json``."""
        return self.root / "tokens" / self.data_key()

    def prepare_data(self) -> None:
        """Build the token folder if it is not cached (``nlplatform.data.prepare``): stream the corpus, split it,
        build the tokenizer on train, tokenise every split into shards. Two preparations of one cache on a machine
        (or on a shared file system with locks) do the work once: the second waits for the first and finds it done."""
        folder = self.data_dir()
        if (folder / "meta.json").is_file():
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = folder.parent / f".{folder.name}.lock"
        with exclusive_lock(lock, f"another process is preparing this data ({lock}); waiting for it"):
            if (folder / "meta.json").is_file():  # prepared by whoever held the lock before us
                return
            self._prepare(folder)

    def _prepare(self, folder: Path) -> None:
        from nlplatform.data.prepare import prepare_folder

        clean_stale_temporaries(folder.parent)  # staging folders of builds that were killed
        cfg = self.cfg
        staging = make_staging_dir(folder)
        try:
            meta = {"format": FORMAT, "key": folder.name, **prepare_folder(cfg, self.root, staging)}
            meta["config"] = {
                "tokenizer": cfg.tokenizer,
                "bpe_vocab_size": cfg.bpe_vocab_size,
                "tokenizer_sample_bytes": cfg.tokenizer_sample_bytes,
                "paths": list(cfg.paths),
                "hf_dataset": cfg.hf_dataset,
                "hf_config": cfg.hf_config,
                "hf_split": cfg.hf_split,
                "text_field": cfg.text_field,
                "val_fraction": cfg.val_fraction,
                "test_fraction": cfg.test_fraction,
                "split_seed": cfg.split_seed,
                "max_tokens": cfg.max_tokens,
            }
            atomic_write_text(staging / "meta.json", json.dumps(meta, indent=1) + "\n")
            if folder.exists():  # a folder without meta.json: not a cache (an old layout's remains or damage)
                shutil.rmtree(folder)
            os.rename(staging, folder)
            fsync_dir(folder.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        docs_line = "/".join(str(meta["documents"][s]) for s in SPLITS)
        tokens_line = "/".join(f"{meta['tokens'][s]:,}" for s in SPLITS)
        print(
            f"nlplatform: data ready in {folder}: train/val/test {docs_line} documents, {tokens_line} tokens "
            f"({meta['tokenizer']['name']}, vocab {meta['vocab_size']})",
            file=sys.stderr,
        )

    def setup(self, stage: str | None = None) -> None:
        """Open the cached token files (preparing them first if missing) and check each split fits a window."""
        if self.tokenizer is not None:
            return
        folder = self.data_dir()
        if not (folder / "meta.json").is_file():
            self.prepare_data()
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        spec = meta["tokenizer"]["spec"]
        if spec.startswith("file:"):
            spec = f"file:{folder / spec[len('file:') :]}"
        self.tokenizer = load_tokenizer(spec, name=meta["tokenizer"]["name"])
        self.tokenizer_spec = spec
        self.vocab_size = self.tokenizer.vocab_size
        self.fingerprint = folder.name
        self.num_documents = dict(meta["documents"])
        self.num_tokens = {name: int(read_index(folder, name)["num_tokens"]) for name in SPLITS}
        self._check_split_sizes()
        if self._loaded_state is not None:
            self._compare_state(self._loaded_state)

    def _check_split_sizes(self) -> None:
        need = self.cfg.seq_len + 1
        for name, knob in (("train", None), ("val", "val_fraction"), ("test", "test_fraction")):
            have = self.num_tokens[name]
            if have < need:
                more = f"a larger data.{knob}" if knob else "a larger corpus (or smaller val/test fractions)"
                raise UserError(
                    f"the {name} split has {have} tokens, fewer than data.seq_len + 1 = {need} needed for one window; "
                    f"use a smaller data.seq_len or {more}"
                )

    def _require_setup(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("call TextDataModule.setup() first")
        return self.tokenizer

    def windows(self, split: str) -> TokenWindows:
        """All windows of ``split`` (``train``, ``val`` or ``test``), in order."""
        self._require_setup()
        return TokenWindows(TokenShards(self.data_dir(), split), self.cfg.seq_len)

    # ----------------------------------------------------------------------------------------- loaders

    def _distribution(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the attached trainer, ``(0, 1)`` when none."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        world = int(trainer.world_size)
        # Lightning would otherwise wrap our samplers in a DistributedSampler and shard everything twice.
        connector = getattr(trainer, "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise RuntimeError(
                "TextDataModule shards its data over ranks itself: build the Trainer with use_distributed_sampler=False"
            )
        return int(trainer.global_rank), world

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.cfg.num_workers
        return {
            "batch_size": self.cfg.batch_size,
            "num_workers": workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": workers > 0,
        }

    def consumed_samples(self) -> int:
        """Training windows consumed by all ranks together: the count carried by the resumed checkpoint plus
        ``batch_size * world_size * accumulate_grad_batches`` per optimizer step since."""
        trainer = self.trainer
        if trainer is None:
            return self._base_consumed
        per_step = self.cfg.batch_size * int(trainer.world_size) * int(trainer.accumulate_grad_batches)
        return self._base_consumed + (int(trainer.global_step) - self._base_step) * per_step

    def train_dataloader(self) -> DataLoader:
        """Shuffled windows forever, resumed at ``consumed_samples()`` of the global stream and sharded over ranks."""
        dataset = self.windows("train")
        rank, world = self._distribution()
        sampler = ResumableSampler(len(dataset), self.seed, rank=rank, world_size=world, start=self.consumed_samples())
        return DataLoader(dataset, sampler=sampler, drop_last=True, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def eval_indices(self, split: str, rank: int = 0, world_size: int = 1, accumulate: int = 1) -> list[int]:
        """The windows of ``split`` that rank ``rank`` evaluates, in order.

        With ``data.val_batches > 0`` the evaluation covers ``val_batches`` optimizer steps' worth of sequences
        (``batch_size x world_size x accumulate`` each), so the windows are the same on any number of devices that
        keeps the tokens per step (what a resume on another world size must keep): each rank then runs
        ``val_batches x accumulate`` batches. The windows are spread evenly over the whole split (not just its first
        documents), so the estimate covers every held-out document while staying the same windows at every
        evaluation. Each rank gets an equal contiguous block, so all ranks run the same number of batches.
        """
        total = len(self.windows(split))
        chosen = total
        if self.cfg.val_batches:
            chosen = min(total, self.cfg.val_batches * self.cfg.batch_size * world_size * accumulate)
        per_rank = chosen // world_size
        if per_rank == 0:
            raise UserError(
                f"the {split} split has {total} windows of {self.cfg.seq_len} tokens, fewer than the {world_size} "
                f"devices evaluating it; use a smaller data.seq_len or more held-out data"
            )
        # floor(k * total / chosen) is strictly increasing when chosen <= total: distinct, evenly spread windows.
        selected = (np.arange(chosen, dtype=np.int64) * total) // chosen
        return selected[rank * per_rank : (rank + 1) * per_rank].tolist()

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self._distribution()
        accumulate = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)
        dataset = Subset(self.windows(split), self.eval_indices(split, rank, world, accumulate))
        return DataLoader(dataset, shuffle=False, drop_last=False, **self._loader_kwargs())

    # ----------------------------------------------------------------------------------------- baseline and state

    def unigram_perplexity(self) -> float:
        """Perplexity of the val split under the train split's unigram distribution (add-one smoothing).

        The baseline a trained model must beat: a model that learned only token frequencies scores about this.
        """
        tokenizer = self._require_setup()
        vocab = tokenizer.vocab_size
        folder = self.data_dir()
        train_counts, val_counts = (read_counts(folder, split) for split in ("train", "val"))
        log_p = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab)
        nll = -float((val_counts * log_p).sum()) / float(val_counts.sum())
        return float(np.exp(nll))

    def summary(self) -> dict[str, Any]:
        """Documents, tokens and windows per split, plus tokenizer and cache folder: what ``nlplatform data`` shows."""
        tokenizer = self._require_setup()
        return {
            "folder": str(self.data_dir()),
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "seq_len": self.cfg.seq_len,
            "documents": dict(self.num_documents),
            "tokens": dict(self.num_tokens),
            "windows": {name: (n - 1) // self.cfg.seq_len for name, n in self.num_tokens.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint records about the data: its cache key, tokenizer spec and vocabulary size, and how
        far into the training stream the run is (windows consumed by all ranks, at which optimizer step)."""
        if self.fingerprint is None:
            return {"fingerprint": self.data_key()}
        step = int(self.trainer.global_step) if self.trainer is not None else self._base_step
        return {
            "fingerprint": self.fingerprint,
            "tokenizer": self.tokenizer_spec,
            "vocab_size": self.vocab_size,
            "consumed_samples": self.consumed_samples(),
            "at_step": step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training stream where the checkpoint left it; warn (do not fail) when the checkpoint was
        trained on different data than this configuration gives."""
        self._loaded_state = dict(state_dict)
        self._base_consumed = int(state_dict.get("consumed_samples", 0))
        self._base_step = int(state_dict.get("at_step", 0))
        if self.fingerprint is not None:
            self._compare_state(self._loaded_state)

    def _compare_state(self, saved: dict[str, Any]) -> None:
        old = saved.get("fingerprint")
        if old is not None and old != self.fingerprint:
            old_vocab = saved.get("vocab_size")
            rank_zero_warn(
                f"the checkpoint was trained on data {old} (vocab {old_vocab}), but this configuration gives "
                f"{self.fingerprint} (vocab {self.vocab_size}): the corpus, its split or the tokenizer changed; "
                f"training continues on the new data"
            )
