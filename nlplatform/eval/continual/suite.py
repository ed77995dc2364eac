"""``nlplatform eval CHECKPOINT --suite continual``: learn a sequence of domains or classes, measure what is forgotten.

Two protocols (after Nested Learning's continual-learning experiments, arXiv Fig. 6 and 8), each starting from the
checkpoint's weights (``--protocol``, both by default):

**domains** (``domains.py``). Stage ``i`` fine-tunes the model on text domain ``i`` for ``stage_steps`` optimizer
steps; after every stage (and once before the first) the model's loss is measured on the held-out part of every domain
and of the checkpoint's own corpus, each window from a fresh state (``frozen``) or the windows as one stream through
the decoding state (``ttl``, test-time learning; ``--mode``). The stage-by-domain perplexity matrix gives the average
perplexity, average forgetting and backward / forward transfer (``scores.py``).

**classes.** Class-incremental intent classification with a generative head (``class_incremental.py``): tasks of
three intents from the project's synthetic intent set (``intents.py``) learned one after the other, labels generated
as text, accuracy among all labels seen so far (class-IL) and within the example's task (task-IL) after each stage.

Results (``nlplatform/eval/report.py``): ``eval-continual-<checkpoint>.json`` beside the checkpoint, ``...-matrix.png``
(the perplexity matrices as heatmaps, one panel per mode) and ``...-classes.png`` (the accuracy matrices; ``plots.py``),
``eval/continual/<frozen|ttl|class_il|task_il>/...`` metrics and the files in the checkpoint's MLflow run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nlplatform.errors import UserError
from nlplatform.eval.checkpoint import heldout_tokens, load
from nlplatform.eval.continual.class_incremental import SETTINGS, run_class_incremental
from nlplatform.eval.continual.domains import DOMAINS, run_domains
from nlplatform.eval.continual.intents import TASKS
from nlplatform.eval.continual.plots import plot_matrices
from nlplatform.eval.report import SuiteResult, plot_title, publish, results_stem

SUITE = "continual"
MODES = ("frozen", "ttl")
PROTOCOLS = ("domains", "classes")
DEFAULT_DOMAINS = ("encyclopedia", "howto", "fiction")
DEFAULT_CLASS_TASKS = ("banking", "travel", "home")


@dataclass(frozen=True)
class ContinualSettings:
    domains: tuple[str, ...] = DEFAULT_DOMAINS
    stage_steps: int = 50  # optimizer steps of fine-tuning per domain
    batch_size: int = 8  # windows per step
    lr_scale: float | None = None  # fine-tuning lr = each level's peak lr times this; None: the recipe's min_lr_ratio
    eval_windows: int = 16  # held-out windows per domain (consecutive: the ttl stream)
    modes: tuple[str, ...] = MODES
    protocols: tuple[str, ...] = PROTOCOLS
    class_tasks: tuple[str, ...] = DEFAULT_CLASS_TASKS  # intent tasks in training order (classes protocol)
    train_per_label: int = 64  # distinct training utterances per intent (the stream repeats them)
    test_per_label: int = 16  # held-out utterances per intent
    seed: int = 0

    def check(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise UserError(f"--protocol must be one of domains, classes or both, got {', '.join(bad) or 'none'}")
        for what, names, known in (("domain", self.domains, DOMAINS), ("intent task", self.class_tasks, TASKS)):
            unknown = [d for d in names if d not in known]
            if unknown:
                raise UserError(f"unknown continual {what}(s) {', '.join(unknown)}; available: {', '.join(known)}")
            if len(names) < 2 or len(set(names)) != len(names):
                raise UserError(f"give at least 2 different {what}s, got {list(names)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise UserError(f"--mode must be one of frozen, ttl or both, got {', '.join(bad) or 'none'}")
        for name in ("stage_steps", "batch_size", "eval_windows", "train_per_label", "test_per_label"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be > 0, got {getattr(self, name)}")
        if self.lr_scale is not None and not self.lr_scale > 0:
            raise UserError(f"the fine-tuning lr scale must be > 0, got {self.lr_scale}")


def finetune(
    model, tokens: torch.Tensor, recipe, settings: ContinualSettings, seed: int, targets: torch.Tensor | None = None
) -> float:
    """``stage_steps`` steps on random windows of ``tokens`` with the recipe's optimizer and level structure: each
    persistent level steps at its own period (``LevelScheduler``) with its own learning rate times ``lr_scale``,
    held constant. ``targets`` (bool, like ``tokens``) limits the loss to the tokens it marks (a classifier's labels);
    the model still reads everything. Returns the last step's loss."""
    from nlplatform.levels import LevelScheduler
    from nlplatform.optim import build_optimizer, level_param_groups

    device = next(model.parameters()).device
    optim_cfg, seq_len, clip = recipe.optim, recipe.data.seq_len, recipe.trainer.gradient_clip_val
    groups, adamw_only = level_param_groups(model, optim_cfg)
    for group in groups:
        group["lr"] *= settings.lr_scale if settings.lr_scale is not None else optim_cfg.min_lr_ratio
    opt = build_optimizer(groups, optim_cfg, adamw_only=adamw_only)
    levels = LevelScheduler(model.levels(), settings.batch_size * seq_len)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(math.nan)
    for step in range(settings.stage_steps):
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (settings.batch_size,), generator=generator)
        batch = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).to(device)
        nll = F.cross_entropy(model(batch[:, :-1]).float().transpose(1, 2), batch[:, 1:], reduction="none")
        if targets is None:
            loss = nll.mean()
        else:
            marked = torch.stack([targets[s + 1 : s + seq_len + 1] for s in starts.tolist()]).to(device)
            loss = (nll * marked).sum() / marked.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        levels.before_optimizer_step(step, clip or None)  # clipped before slow levels hold theirs back
        opt.step()
    model.eval()
    return float(loss.detach())


def evaluate_continual(
    checkpoint: str | Path, settings: ContinualSettings, *, device: str | None = None, track: bool = True
) -> SuiteResult:
    """Run the protocols above on ``checkpoint``; write and log the matrices and scores."""
    settings.check()
    checkpoint = Path(checkpoint)
    loaded = load(checkpoint, device)
    t0 = time.time()
    stem, title = results_stem(checkpoint, SUITE), plot_title(loaded)
    fields: dict = {"settings": asdict(settings), "seq_len": loaded.recipe.data.seq_len}
    metrics: dict[str, float] = {}
    plots: list[Path] = []
    start = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    for protocol in settings.protocols:
        loaded.model.load_state_dict(start)  # each protocol starts from the checkpoint's weights
        section, plot = _run_protocol(protocol, loaded, settings, stem, title)
        fields[protocol] = section
        metrics.update(
            {f"eval/continual/{kind}/{k}": v for kind, scores in section["scores"].items() for k, v in scores.items()}
        )
        plots.append(plot)
    fields["wall_s"] = time.time() - t0
    return publish(checkpoint, loaded, SUITE, fields, metrics, plots, track=track)


def _run_protocol(protocol: str, loaded, settings: ContinualSettings, stem: Path, title: str) -> tuple[dict, Path]:
    """One protocol on the loaded model (changed in place): its report section (with ``scores`` per reading mode or
    class setting) and the heatmaps of its matrices."""
    from tqdm.auto import tqdm

    recipe, model, tokenizer = loaded.recipe, loaded.model, loaded.tokenizer

    def train(model, tokens, targets, seed: int) -> float:
        return finetune(model, tokens, recipe, settings, seed, targets)

    if protocol == "domains":
        with tqdm(total=len(settings.domains) + 1, desc="continual: domain stages", unit="stage") as bar:
            section = run_domains(
                model,
                tokenizer,
                settings.domains,
                settings.modes,
                train,
                corpus=heldout_tokens(loaded),
                seq_len=recipe.data.seq_len,
                eval_windows=settings.eval_windows,
                seed=settings.seed,
                progress=bar,
            )
        rows = [s if s == "start" else f"after {s}" for s in section["stages"]]
        return section, plot_matrices(
            section["perplexity"],
            rows,
            section["columns"],
            stem.with_name(f"{stem.name}-matrix.png"),
            f"continual learning, domains: {title}",
            "perplexity",
        )
    with tqdm(total=len(settings.class_tasks), desc="continual: class stages", unit="stage") as bar:
        section = run_class_incremental(
            model,
            tokenizer,
            settings.class_tasks,
            train,
            train_per_label=settings.train_per_label,
            test_per_label=settings.test_per_label,
            seq_len=recipe.data.seq_len,
            seed=settings.seed,
            progress=bar,
        )
    rows = [f"after {t}" for t in settings.class_tasks]
    return section, plot_matrices(
        section["accuracy"],
        rows,
        list(settings.class_tasks),
        stem.with_name(f"{stem.name}-classes.png"),
        f"class-incremental intents: {title}",
        "accuracy",
    )


def format_summary(metrics: dict[str, float]) -> str:
    """One markdown table per protocol that ran."""
    out = []
    keys = ("average", "forgetting", "backward_transfer", "forward_transfer")
    for kinds, head in (
        (MODES, "mode | avg ppl | forgetting (ppl)"),
        (SETTINGS, "setting | avg accuracy | forgetting"),
    ):
        rows = []
        for kind in kinds:
            if f"eval/continual/{kind}/average" in metrics:
                values = [metrics.get(f"eval/continual/{kind}/{k}") for k in keys]
                rows.append(f"| {kind} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + " |")
        if rows:
            out += [f"| {head} | backward transfer | forward transfer |", "|---|---|---|---|---|", *rows, ""]
    return "\n".join(out).rstrip()
