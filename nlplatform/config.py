"""The recipe schema and its loader.

A recipe is a YAML file of deviations from the dataclass defaults below, plus ``key=value`` overrides from the
command line. Loading is strict: an unknown key fails with a "Did you mean" hint, a value of the wrong type fails
with the key's name, and every dataclass checks its own values in ``__post_init__``.

The ``model`` section is two-stage. ``model.name`` picks a family in the registry, ``model.preset`` picks one of that
family's named sizes, and the remaining ``model.*`` keys override fields of the family's own config dataclass.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nlplatform.errors import ConfigError
from nlplatform.secrets import mask

# Field metadata of a key whose value may differ between a checkpoint's recipe and the recipe that resumes it (where
# the run is written, how long it runs, on how many devices, what is logged); every other key must be equal, or the
# resume is refused with the difference (``resume_differences``). "tokens per step": may change as long as the
# global tokens per optimizer step stay the same (checked when the run starts: level periods and the data position
# are counted in them).
RESUMABLE = {"resume": "may change"}
SAME_TOKENS_PER_STEP = {"resume": "tokens per step"}
# A model field with metadata {"derived": "data.seq_len"} takes that recipe value when a recipe loads (HOPE's training
# window): it is not a recipe key, so it is refused in recipes, left out of saved ones, and dropped from old ones.
DERIVED = "derived"


def _positive(section: str, **values: float | int | None) -> None:
    """Each value None or a finite number > 0 (nan and inf are refused: nan compares false with everything)."""
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{section}.{name} must be > 0, got {value}")


def _non_negative(section: str, **values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{section}.{name} must be >= 0, got {value}")


@dataclass
class ModelConfig:
    """Fields every model family shares; each family subclasses this with its own sizes (see ``registry``)."""

    name: str = "transformer"  # registry key: transformer, deltanet, gated_deltanet, titans, hope
    preset: str = "tiny"  # a named size of the family: tiny (CPU minutes), 340m, 760m, 1.3b
    vocab_size: int | None = None  # filled from the tokenizer when unset, so one recipe serves any tokenizer
    kernel_backend: Literal["auto", "triton", "reference"] = "auto"  # auto = Triton on CUDA, reference otherwise
    variant: str | None = None  # family sub-architecture (Titans lmm/mac/mag/mal, HOPE hope/attention)

    def __post_init__(self) -> None:
        _positive("model", vocab_size=self.vocab_size)


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
        _positive("data", seq_len=self.seq_len, batch_size=self.batch_size, bpe_vocab_size=self.bpe_vocab_size,
                  tokenizer_sample_bytes=self.tokenizer_sample_bytes)  # fmt: skip
        _non_negative("data", val_batches=self.val_batches, num_workers=self.num_workers)
        _positive("data", num_proc=self.num_proc, max_tokens=self.max_tokens)
        if not (self.tokenizer in ("bytes", "bpe") or self.tokenizer.startswith("file:")):
            raise ConfigError(f"data.tokenizer must be 'bytes', 'bpe' or 'file:PATH', got {self.tokenizer!r}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 0.5:
                raise ConfigError(f"data.{name} must be in (0, 0.5), got {value}")
        if self.paths and self.hf_dataset:
            raise ConfigError("set either data.paths or data.hf_dataset, not both")
        if self.bpe_vocab_size < 258:
            raise ConfigError(
                f"data.bpe_vocab_size must be >= 258 (256 bytes + end-of-text + merges), got {self.bpe_vocab_size}"
            )


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw, momentum, delta_momentum, dmgd, muon, m3 (nlplatform/optim; spec §1.2-1.5, §3.3)
    lr: float = 3e-3  # peak learning rate after warm-up
    weight_decay: float = 0.1  # decoupled decay on matrices only (never on norms, biases or embeddings)
    beta1: float = 0.9  # first-moment decay (the momentum level of Adam, spec §1.4)
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
        from nlplatform.optim import check_name

        check_name(self.name)
        _positive("optim", slow_every=self.slow_every, ns_steps=self.ns_steps, dmgd_hidden=self.dmgd_hidden)
        _non_negative("optim", decay_lr=self.decay_lr, dmgd_inner_lr=self.dmgd_inner_lr, slow_weight=self.slow_weight)
        for name in ("momentum", "beta3"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.dmgd_retention <= 1.0:
            raise ConfigError(f"optim.dmgd_retention must be in (0, 1], got {self.dmgd_retention}")
        for name, allowed in (("precondition", ("none", "adam")), ("m3_accumulate", ("ema", "sum"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"optim.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.name == "delta_momentum" and self.normalize_decay and self.decay_lr > self.momentum:
            raise ConfigError(
                f"optim.decay_lr ({self.decay_lr}) must not exceed optim.momentum ({self.momentum}): the decay "
                "factor momentum - decay_lr * sigma^2 of delta momentum would turn negative"
            )
        _positive("optim", lr=self.lr, eps=self.eps)
        _non_negative("optim", weight_decay=self.weight_decay, warmup_steps=self.warmup_steps)
        for name in ("beta1", "beta2", "min_lr_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1], got {value}")


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
        _positive(
            "trainer",
            max_steps=self.max_steps,
            val_check_interval=self.val_check_interval,
            num_nodes=self.num_nodes,
            accumulate_grad_batches=self.accumulate_grad_batches,
            log_every_n_steps=self.log_every_n_steps,
        )
        _non_negative(
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
        _non_negative(
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


# --------------------------------------------------------------------------------------------- loading


def _suggest(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _check_keys(raw: Any, schema: Any, prefix: str) -> None:
    """Fail on the first key of ``raw`` that the dataclass ``schema`` does not declare, with a suggestion."""
    if not isinstance(raw, dict) or not is_dataclass(schema):
        return
    known = {f.name: f for f in fields(schema)}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in known:
            names = [f"{prefix}{k}" for k, f in known.items() if DERIVED not in f.metadata]
            raise ConfigError(f"unknown recipe key '{path}'.{_suggest(path, names)}")
        if DERIVED in known[key].metadata:
            source = known[key].metadata[DERIVED]
            raise ConfigError(f"recipe key '{path}' is not set in recipes: it is {source}; set {source} instead")
        child = getattr(schema, key)
        if is_dataclass(child):
            if not isinstance(value, dict):
                raise ConfigError(f"recipe key '{path}' is a section; give its keys, e.g. {path}.<key>=...")
            _check_keys(value, child, f"{path}.")


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"could not parse overrides {list(overrides)}: {exc}") from None


def _schema_for(raw: dict[str, Any]) -> RecipeConfig:
    """The default recipe whose ``model`` is the chosen family's config, filled with the chosen preset."""
    from nlplatform import registry

    model_raw = raw.get("model") or {}
    if not isinstance(model_raw, dict):
        raise ConfigError("recipe key 'model' is a section; give its keys, e.g. model.name=transformer")
    name = model_raw.get("name", ModelConfig.name)
    preset = model_raw.get("preset", ModelConfig.preset)
    model_cfg = registry.model_config(str(name), str(preset))
    return RecipeConfig(model=model_cfg)


def _derived(schema: RecipeConfig, raw: dict[str, Any]) -> dict[str, Any]:
    """The model fields derived from other recipe keys (``DERIVED``), with their values in ``raw``."""
    out = {}
    for f in fields(schema.model):
        if DERIVED in f.metadata:
            section, key = f.metadata[DERIVED].split(".")
            out[f.name] = (raw.get(section) or {}).get(key, getattr(getattr(schema, section), key))
    return out


def _from_raw(raw: dict[str, Any]) -> RecipeConfig:
    schema = _schema_for(raw)
    _check_keys(raw, schema, "")
    derived = _derived(schema, raw)
    if derived:  # set before the model's own checks run, so they see the real values
        raw = {**raw, "model": {**(raw.get("model") or {}), **derived}}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        message = str(exc).splitlines()[0]
        raise ConfigError(f"recipe key '{key}': {message}" if key else f"invalid recipe: {message}") from None
    assert isinstance(cfg, RecipeConfig)
    return cfg


def _load_raw(path: str | Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The recipe file merged with the overrides, as plain containers (keys and values not yet checked)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("**/*.yaml"))[:8]
        raise ConfigError(
            f"recipe {path} is a folder; give a recipe file" + (f", e.g. {', '.join(found)}" if found else "")
        )
    if not path.is_file():
        hint = ""
        if Path("recipes").is_dir():
            found = sorted(str(p) for p in Path("recipes").glob("*/*.yaml"))
            if found:
                hint = _suggest(str(path), found) or f" Recipes: {', '.join(found)}"
        raise ConfigError(f"recipe file not found: {path}.{hint}")
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError, UnicodeDecodeError, ...
        raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if file_cfg is None or not isinstance(file_cfg, DictConfig):
        raise ConfigError(f"recipe {path} must be a mapping of sections (model:, data:, ...)")
    merged = OmegaConf.merge(file_cfg, _parse_overrides(overrides))
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Load ``path`` (YAML), apply ``key=value`` overrides, validate strictly, return the typed recipe."""
    return _from_raw(_load_raw(path, overrides))


def check_recipe_keys(path: str | Path, overrides: Sequence[str], keys: Iterable[str]) -> None:
    """Fail (with a "Did you mean") when a dotted key such as ``model.cms_chunk_sizes`` is not a key of the recipe
    ``path`` + ``overrides`` (whose model family decides the ``model.*`` keys). Only names are checked: a search
    space names keys before it has values for them."""
    raw = _load_raw(path, overrides)
    schema = _schema_for(raw)
    for key in keys:
        probe: dict[str, Any] = {}
        node = probe
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None
        _check_keys(probe, schema, "")
        node = schema
        for i, part in enumerate(parents):
            node = getattr(node, part)
            if not is_dataclass(node):
                raise ConfigError(f"recipe key '{'.'.join(parents[: i + 1])}' is a value, not a section: '{key}'")
        if is_dataclass(getattr(node, leaf)):
            raise ConfigError(f"recipe key '{key}' is a section, not a value; name one of its keys")


# Keys that saved recipes may hold but the schema no longer has, and why they went: dropped when a saved recipe loads.
RETIRED_KEYS = {
    "model.context_len": "HOPE's training window is data.seq_len",  # a recipe key until it became DERIVED
}
_said_dropped: set[str] = set()


def _drop_unknown(raw: Any, schema: Any, prefix: str) -> list[str]:
    """Remove from ``raw`` (in place) the keys the dataclass ``schema`` does not declare; return their dotted names."""
    if not isinstance(raw, dict) or not is_dataclass(schema):
        return []
    known = {f.name for f in fields(schema) if DERIVED not in f.metadata}
    dropped = []
    for key in list(raw):
        if key not in known:
            dropped.append(f"{prefix}{key}")
            del raw[key]
        elif is_dataclass(getattr(schema, key)):
            dropped += _drop_unknown(raw[key], getattr(schema, key), f"{prefix}{key}.")
    return dropped


def recipe_from_dict(raw: dict[str, Any], saved: bool = False) -> RecipeConfig:
    """Rebuild a recipe saved with ``recipe_to_dict`` (checkpoints, run folders), with the same strict checks.
    ``saved``: the recipe was written by an earlier version, so keys the schema no longer has are dropped (said once
    per key on stderr, with the reason when ``RETIRED_KEYS`` knows it) instead of refused."""
    if saved:
        raw = copy.deepcopy(raw)
        for key in _drop_unknown(raw, _schema_for(raw), ""):
            if key not in _said_dropped:
                _said_dropped.add(key)
                why = RETIRED_KEYS.get(key, "not a key of this version")
                print(f"saved recipe: dropped {key} ({why})", file=sys.stderr)
    return _from_raw(raw)


def resumable_keys(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Dotted recipe keys whose field metadata lets them change on resume, with how (``RESUMABLE``,
    ``SAME_TOKENS_PER_STEP``)."""
    out: dict[str, str] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update(resumable_keys(value, f"{prefix}{f.name}."))
        elif "resume" in f.metadata:
            out[f"{prefix}{f.name}"] = f.metadata["resume"]
    return out


def resume_differences(saved: dict[str, Any], cfg: RecipeConfig) -> list[str]:
    """``key: checkpoint X, now Y`` for every key of the resolved recipe ``cfg`` that differs from the checkpoint's
    saved recipe, except those the schema lets change on resume."""
    allowed = resumable_keys(cfg)
    old = flatten(recipe_to_dict(recipe_from_dict(saved, saved=True)))
    new = flatten(recipe_to_dict(cfg))
    return [
        f"{key}: checkpoint {old.get(key)!r}, now {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key not in allowed and old.get(key) != new.get(key)
    ]


def recipe_to_dict(cfg: RecipeConfig, *, masked: bool = False) -> dict[str, Any]:
    """The recipe as plain containers, without the derived model fields (they are not recipe keys). ``masked``: with
    the password of every URL in it masked (``nlplatform.secrets``), for everything written down (``recipe.yaml``,
    checkpoint hyperparameters); only the live recipe keeps it, to connect."""
    out: dict[str, Any] = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[assignment]
    for f in fields(cfg.model):
        if DERIVED in f.metadata:
            del out["model"][f.name]
    return _masked(out) if masked else out


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return mask(value) if isinstance(value, str) else value


def recipe_to_yaml(cfg: RecipeConfig) -> str:
    """The recipe as written into a run folder (passwords masked)."""
    return OmegaConf.to_yaml(OmegaConf.create(recipe_to_dict(cfg, masked=True)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: the recipe as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
