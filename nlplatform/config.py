"""The recipe schema: one dataclass per section, whose defaults are what a recipe does not say.

A recipe is a YAML file of deviations from these defaults plus ``key=value`` overrides from the command line;
``recipe.py`` loads and saves it. Every dataclass checks its own values in ``__post_init__`` (with
``nlplatform.validate``); names that live in a registry (``model.name``, ``optim.name``) are checked by the registry
when the recipe loads. This module imports nothing of the project but ``validate`` and ``errors``: the model
families and the optimizers build on it, never the other way round.

The ``model`` section is two-stage. ``model.name`` picks a family in the registry, ``model.preset`` picks one of that
family's named sizes, and the remaining ``model.*`` keys override fields of the family's own config dataclass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from nlplatform.errors import ConfigError
from nlplatform.validate import in_range, non_negative, one_of, positive

# Field metadata of a key whose value may differ between a checkpoint's recipe and the recipe that resumes it (where
# the run is written, how long it runs, on how many devices, what is logged); every other key must be equal, or the
# resume is refused with the difference (``resume_differences``). "tokens per step": may change as long as the
# global tokens per optimizer step stay the same (checked when the run starts: level periods and the data position
# are counted in them).
RESUMABLE = {"resume": "may change"}
SAME_TOKENS_PER_STEP = {"resume": "tokens per step"}
# A model field with metadata {DERIVED: "data.seq_len"} (``nlplatform.validate.DERIVED``) takes that recipe value when
# a recipe loads (HOPE's training window): it is not a recipe key, so it is refused in recipes, left out of saved ones,
# and dropped from old ones.


@dataclass
class ModelConfig:
    """Fields every model family shares; each family subclasses this with its own sizes (see ``registry``)."""

    name: str = "transformer"  # registry key: transformer, deltanet, gated_deltanet, titans, hope
    preset: str = "tiny"  # a named size of the family: tiny (CPU minutes), 340m, 760m, 1.3b
    vocab_size: int | None = None  # filled from the tokenizer when unset, so one recipe serves any tokenizer
    kernel_backend: Literal["auto", "triton", "reference"] = "auto"  # auto = Triton on CUDA, reference otherwise
    variant: str | None = None  # family sub-architecture (Titans lmm/mac/mag/mal, HOPE hope/attention)

    def __post_init__(self) -> None:
        positive("model", vocab_size=self.vocab_size)


@dataclass
class DataConfig:
    seq_len: int = 256  # tokens per training window; in-context state is reset at every window
    batch_size: int = field(default=16, metadata=SAME_TOKENS_PER_STEP)  # windows per micro-batch on each device
    tokenizer: str = "bytes"  # bytes (257 ids), bpe (trained on the train split, cached) or file:PATH/tokenizer.json
    bpe_vocab_size: int = 4096  # vocabulary of the bpe tokenizer, end-of-text token included
    # the bpe tokenizer is trained on at most this much train text (a deterministic spread of documents): bounded memory
    # and time on any corpus; the default corpus (5 MB) is used whole
    tokenizer_sample_bytes: int = 64_000_000
    paths: list[str] = field(default_factory=list)  # txt/jsonl/json/parquet/arrow files or folders (replace default)
    hf_dataset: str | None = None  # a Hugging Face dataset name or saved folder (replaces the default corpus)
    hf_config: str | None = None  # the dataset's configuration name, when it has several
    hf_split: str = "train"  # split read from hf_dataset before our own train/val/test split
    text_field: str = "text"  # column holding the document text in user corpora
    val_fraction: float = 0.05  # share of documents held out for validation (at least one document)
    test_fraction: float = 0.05  # share of documents held out for the test split (at least one document)
    split_seed: int = 0  # seed of the document split; kept apart from `seed` so model seeds do not move the split
    # optimizer steps' worth of validation sequences per evaluation (batch x devices x accumulation each, so the same
    # windows on any layout with the same tokens per step); 0 = the whole validation split
    val_batches: int = 16
    num_workers: int = field(
        default=0, metadata=RESUMABLE
    )  # DataLoader workers; windows are small reads from the token shards, so 0 is usually fastest on small machines
    # processes tokenising the corpus while it is prepared (None = the cores available); the tokens do not depend on it
    num_proc: int | None = field(default=None, metadata=RESUMABLE)
    # stop reading the corpus once this many tokens (all splits) are prepared; None = all of it. Part of the cache key
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        positive(
            "data",
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            bpe_vocab_size=self.bpe_vocab_size,
            tokenizer_sample_bytes=self.tokenizer_sample_bytes,
        )
        non_negative("data", val_batches=self.val_batches, num_workers=self.num_workers)
        positive("data", num_proc=self.num_proc, max_tokens=self.max_tokens)
        if not (self.tokenizer in ("bytes", "bpe") or self.tokenizer.startswith("file:")):
            raise ConfigError(f"data.tokenizer must be 'bytes', 'bpe' or 'file:PATH', got {self.tokenizer!r}")
        for name in ("val_fraction", "test_fraction"):
            in_range("data", name, getattr(self, name), 0.0, 0.5, open_low=True, open_high=True)
        if self.paths and self.hf_dataset:
            raise ConfigError("set either data.paths or data.hf_dataset, not both")
        if self.bpe_vocab_size < 258:
            raise ConfigError(
                f"data.bpe_vocab_size must be >= 258 (256 bytes + end-of-text + merges), got {self.bpe_vocab_size}"
            )


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw, momentum, delta_momentum, dmgd, muon, m3 (the table in nlplatform/optim/__init__.py)
    # peak learning rate after warm-up; None = the optimizer's own default (``nlplatform.optim.DEFAULT_LR``), which is
    # also what a recipe's rate becomes when the command line switches to another optimizer (``recipe.py``)
    lr: float | None = None
    weight_decay: float = 0.1  # decoupled decay on matrices only (never on norms, biases or embeddings)
    beta1: float = 0.9  # first-moment decay (the momentum level of Adam, Nested Learning arXiv App. B)
    beta2: float = 0.95  # second-moment decay; 0.95 is the usual LM-pretraining choice
    eps: float = 1e-8
    warmup_steps: int = 50  # linear warm-up from 0 to lr, in optimizer steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at trainer.max_steps
    # momentum, delta_momentum, muon: the momentum memory's retention alpha (m <- alpha m - lr P g)
    momentum: float = 0.9
    precondition: str = "none"  # momentum / delta_momentum value P(g): none (g) or adam (g / sqrt(second moment))
    decay_lr: float = 0.5  # delta_momentum: step size on the gradient-dependent decay m (alpha I - decay_lr g^T g)
    normalize_decay: bool = True  # delta_momentum: use g / ||g|| in the decay (keeps it in [alpha - decay_lr, alpha])
    dmgd_hidden: int = 8  # dmgd: hidden width of each tensor's MLP momentum memory
    dmgd_inner_lr: float = 0.1  # dmgd: the memory's own learning rate on its next-gradient prediction loss
    dmgd_retention: float = 0.999  # dmgd: the memory parameters' retention per step (decay toward the identity)
    ns_steps: int = 5  # muon, m3: Newton-Schulz iterations
    beta3: float = 0.9  # m3: decay of the slow momentum between its chunk updates
    slow_every: int = 10  # m3: optimizer steps per chunk of the slow momentum (the paper's frequency f)
    slow_weight: float = 1.0  # m3: weight alpha of the slow momentum's read-out next to the fast one
    m3_accumulate: str = "ema"  # m3: ema (decaying momenta, Adam's second moment) or sum (Alg. 1 as printed)
    m3_normalize: bool = True  # m3: scale each matrix's update to AdamW's RMS (false: Alg. 1's raw scale, unstable)

    def __post_init__(self) -> None:
        positive("optim", lr=self.lr, eps=self.eps, slow_every=self.slow_every, ns_steps=self.ns_steps)
        positive("optim", dmgd_hidden=self.dmgd_hidden)
        non_negative("optim", decay_lr=self.decay_lr, dmgd_inner_lr=self.dmgd_inner_lr, slow_weight=self.slow_weight)
        non_negative("optim", weight_decay=self.weight_decay, warmup_steps=self.warmup_steps)
        for name in ("momentum", "beta3"):
            in_range("optim", name, getattr(self, name), 0.0, 1.0, open_high=True)
        in_range("optim", "dmgd_retention", self.dmgd_retention, 0.0, 1.0, open_low=True)
        for name in ("beta1", "beta2", "min_lr_ratio"):
            in_range("optim", name, getattr(self, name), 0.0, 1.0)
        one_of("optim", "precondition", self.precondition, ("none", "adam"))
        one_of("optim", "m3_accumulate", self.m3_accumulate, ("ema", "sum"))
        if self.name == "delta_momentum" and self.normalize_decay and self.decay_lr > self.momentum:
            raise ConfigError(
                f"optim.decay_lr ({self.decay_lr}) must not exceed optim.momentum ({self.momentum}): the decay "
                "factor momentum - decay_lr * sigma^2 of delta momentum would turn negative"
            )


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments under their Lightning names, plus resume and checkpoint settings."""

    max_steps: int = field(
        default=400, metadata=RESUMABLE
    )  # optimizer steps; the cosine schedule ends here and a final validation always runs
    val_check_interval: int = 100  # validate (and checkpoint) every this many optimizer steps
    accelerator: str = field(default="auto", metadata=RESUMABLE)  # cpu, gpu, auto
    devices: Any = field(default=1, metadata=RESUMABLE)  # number of devices, a list of ids, or "auto"
    num_nodes: int = field(default=1, metadata=RESUMABLE)
    strategy: str = field(
        default="auto", metadata=RESUMABLE
    )  # auto, ddp, fsdp, ddp_spawn (Lightning strategy names); torchrun / SLURM are detected
    precision: str = "auto"  # auto = bf16-mixed on GPUs with bf16, 32-true on CPU; or any Lightning precision string
    accumulate_grad_batches: int = field(default=1, metadata=SAME_TOKENS_PER_STEP)  # micro-batches per optimizer step
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more FLOPs
    # norm clip of each step's gradient, applied before slow levels hold theirs back (a level's release never rescales
    # another level's step; nlplatform/levels.py); 0 disables
    gradient_clip_val: float = 1.0
    log_every_n_steps: int = field(default=10, metadata=RESUMABLE)  # metric logging period, in optimizer steps
    # "auto" continues the newest unfinished run of this family and preset that is not running; or a checkpoint path
    resume: str | None = field(default=None, metadata=RESUMABLE)
    save_top_k: int = 1  # best checkpoints kept by val loss, besides last.ckpt
    # last.ckpt between validations, so a preempted job loses at most this much: every N optimizer steps / M minutes of
    # training (0 = only at validation). SIGTERM, SIGUSR1 and Ctrl-C always save before stopping
    checkpoint_every_steps: int = field(default=0, metadata=RESUMABLE)
    checkpoint_every_minutes: float = field(default=0.0, metadata=RESUMABLE)
    enable_progress_bar: bool = field(default=True, metadata=RESUMABLE)
    deterministic: bool = False  # torch deterministic algorithms (slower; kill-and-resume is exact without it on CPU)

    def __post_init__(self) -> None:
        positive(
            "trainer",
            max_steps=self.max_steps,
            val_check_interval=self.val_check_interval,
            num_nodes=self.num_nodes,
            accumulate_grad_batches=self.accumulate_grad_batches,
            log_every_n_steps=self.log_every_n_steps,
        )
        non_negative(
            "trainer",
            gradient_clip_val=self.gradient_clip_val,
            checkpoint_every_steps=self.checkpoint_every_steps,
            checkpoint_every_minutes=self.checkpoint_every_minutes,
        )
        if self.save_top_k < -1:
            raise ConfigError(f"trainer.save_top_k must be >= -1, got {self.save_top_k}")
        if isinstance(self.devices, int) and self.devices <= 0:
            raise ConfigError(f"trainer.devices must be > 0, got {self.devices}")


@dataclass
class TrackingConfig:
    enabled: bool = field(
        default=True, metadata=RESUMABLE
    )  # log to MLflow (sqlite:///mlruns.db unless MLFLOW_TRACKING_URI is set)
    experiment: str = field(default="nlplatform", metadata=RESUMABLE)  # MLflow experiment, and the folder under runs/
    run_name: str | None = field(
        default=None, metadata=RESUMABLE
    )  # default: <model>-<preset>-<timestamp>; also the folder name under runs/<experiment>/
    tracking_uri: str | None = field(
        default=None, metadata=RESUMABLE
    )  # overrides MLFLOW_TRACKING_URI and the sqlite default
    system_metrics_every_s: float = field(
        default=10.0, metadata=RESUMABLE
    )  # MLflow system metrics (CPU, memory, each GPU) sampling period; 0 = off
    flush_timeout_s: float = field(
        default=60.0, metadata=RESUMABLE
    )  # at the end of a run, how long to wait for MLflow calls still queued (0 when the store stopped answering)

    def __post_init__(self) -> None:
        for name in ("experiment", "run_name"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
                raise ConfigError(f"tracking.{name} must be a plain name (letters, digits, . _ -), got {value!r}")
        non_negative(
            "tracking", system_metrics_every_s=self.system_metrics_every_s, flush_timeout_s=self.flush_timeout_s
        )


@dataclass
class RecipeConfig:
    seed: int = 1337  # global seed (model init, data order)
    output_dir: str = field(
        default="runs", metadata=RESUMABLE
    )  # runs are written to <output_dir>/<tracking.experiment>/<run>/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:  # numpy's seed range, which Lightning's seed_everything passes it to
            raise ConfigError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
