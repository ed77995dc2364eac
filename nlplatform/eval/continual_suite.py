"""``nlplatform eval CHECKPOINT --suite continual``: learn a sequence of domains or classes, measure what is forgotten.

Two protocols (spec §7.5), each starting from the checkpoint's weights (``--protocol``, both by default):

**domains.** Stage ``i`` fine-tunes the model on text domain ``i`` for ``stage_steps`` optimizer steps; after every
stage (and once before the first) the model's loss is measured on the held-out part of every domain and of the
checkpoint's own corpus. The stage-by-domain perplexity matrix gives the average perplexity, average forgetting and
backward / forward transfer (``continual.py``).

Domains are text the platform has offline, in the eval data (``make eval-data``), each split by document into
training (80%) and held-out (20%) parts: ``encyclopedia`` (BoolQ's Wikipedia passages), ``howto`` (HellaSwag's
WikiHow / ActivityNet contexts with their true endings), ``fiction`` (LAMBADA's book passages), ``science`` (SciQ's
support passages), ``social`` (Social IQa situations with their answers) and ``physical`` (PIQA goals with their
right solutions).

Two ways to read the held-out text (``--mode``):

- ``frozen``: each window of ``seq_len`` tokens from a fresh state, as in training;
- ``ttl`` (test-time learning): the windows of a domain read as one stream through the model's decoding state, so
  in-context levels (Titans' and HOPE's neural memories, the delta-rule states) keep learning across windows; for
  attention the state is a growing KV cache, i.e. the whole stream as context.

**classes.** Class-incremental intent classification with a generative head (``class_incremental.py``): tasks of
three intents from the project's synthetic intent set (``intents.py``) learned one after the other, labels generated
as text, accuracy among all labels seen so far (class-IL) and within the example's task (task-IL) after each stage.

Results: ``eval-continual-<checkpoint>.json`` beside the checkpoint, ``...-matrix.png`` (the perplexity matrices as
heatmaps, one panel per mode) and ``...-classes.png`` (the accuracy matrices), ``eval/continual/<frozen|ttl|class_il|
task_il>/...`` metrics and the files in the checkpoint's MLflow run.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nlplatform.data import atomic_write_text
from nlplatform.errors import UserError
from nlplatform.eval.class_incremental import SETTINGS
from nlplatform.eval.continual import continual_scores

SUITE = "continual"
MODES = ("frozen", "ttl")
PROTOCOLS = ("domains", "classes")


def _first(*keys: str) -> Callable[[dict], str]:
    return lambda row: " ".join(str(row[k]) for k in keys)


# domain -> (eval dataset, row -> text)
DOMAINS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "encyclopedia": ("boolq", _first("passage")),
    "howto": ("hellaswag", lambda r: f"{r['ctx']} {r['endings'][int(r['label'])]}"),
    "fiction": ("lambada", _first("text")),
    "science": ("sciq", _first("support")),
    "social": ("social_iqa", lambda r: f"{r['context']} {r['question']} {r['answer' + 'ABC'[int(r['label']) - 1]]}"),
    "physical": ("piqa", lambda r: f"{r['goal']} {r['sol1'] if int(r['label']) == 0 else r['sol2']}"),
}
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
        from nlplatform.eval.intents import TASKS

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


def domain_texts(domain: str) -> list[str]:
    """The documents of ``domain`` from the offline eval data (fetched on first use)."""
    from nlplatform.eval.data import dataset_file, require_eval_data

    dataset, to_text = DOMAINS[domain]
    path = dataset_file(dataset, require_eval_data())
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from datasets import Dataset

        rows = Dataset.from_file(str(path))
    return [text for text in (to_text(r).strip() for r in rows) if text]


def split_documents(docs: list[str], seed: int, held_out: float = 0.2) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: a seeded shuffle, the last ``held_out`` share held out."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    cut = len(docs) - max(1, round(held_out * len(docs)))
    return [docs[i] for i in order[:cut]], [docs[i] for i in order[cut:]]


def stream(docs: list[str], encode, eot_id: int) -> torch.Tensor:
    """The documents' tokens, each followed by end-of-text, as one 1-D tensor."""
    ids: list[int] = []
    for doc in docs:
        ids += encode(doc) + [eot_id]
    return torch.tensor(ids, dtype=torch.long)


def _windows(tokens: torch.Tensor, seq_len: int, n: int, what: str) -> torch.Tensor:
    """The first ``n`` consecutive windows of ``seq_len + 1`` tokens (inputs and shifted targets)."""
    if tokens.numel() < n * seq_len + 1:
        raise UserError(
            f"{what} has {tokens.numel():,} tokens, fewer than {n} windows of {seq_len}: use fewer (--limit)"
        )
    return torch.stack([tokens[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)])


def held_out_loss(model, windows: torch.Tensor, mode: str, batch_size: int = 8) -> float:
    """Mean next-token loss over ``windows`` [N, T + 1]: each from a fresh state (``frozen``) or all of them as one
    stream through the decoding state (``ttl``)."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():  # not inference mode: Titans and HOPE take inner gradient steps while reading
        if mode == "frozen":
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(batch[:, :-1]).float()
                total += float(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum"))
                count += batch[:, 1:].numel()
            return total / count
        T = windows.shape[1] - 1
        state = model.init_state(1, T * windows.shape[0], device, next(model.parameters()).dtype)
        for window in windows:
            window = window.to(device)[None]
            logits, state = model.step(window[:, :-1], state)
            total += float(F.cross_entropy(logits.float().transpose(1, 2), window[:, 1:], reduction="sum"))
            count += T
    return total / count


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


@dataclass
class ContinualResult:
    path: Path
    metrics: dict[str, float]
    plots: list[Path]
    mlflow_run_id: str | None


def evaluate_continual(
    checkpoint: str | Path, settings: ContinualSettings, *, device: str | None = None, track: bool = True
) -> ContinualResult:
    """Run the protocols above on ``checkpoint``; write and log the matrices and scores."""
    from nlplatform.checkpoint import load_checkpoint
    from nlplatform.eval.run import default_device, log_eval_to_mlflow

    settings.check()
    checkpoint = Path(checkpoint)
    loaded = load_checkpoint(checkpoint, device=device or default_device())
    recipe = loaded.recipe
    t0 = time.time()
    stem = f"eval-{SUITE}-{checkpoint.stem}"
    title = f"{recipe.model.name} ({recipe.model.preset}), step {loaded.step}"
    report: dict = {
        "checkpoint": str(checkpoint.resolve()),
        "step": loaded.step,
        "model": recipe.model.name,
        "preset": recipe.model.preset,
        "suite": SUITE,
        "settings": asdict(settings),
        "seq_len": recipe.data.seq_len,
    }
    metrics: dict[str, float] = {}
    plots: list[Path] = []
    start = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    for protocol in settings.protocols:
        loaded.model.load_state_dict(start)  # each protocol starts from the checkpoint's weights
        run = _domain_protocol if protocol == "domains" else _class_protocol
        section, scores, plot = run(loaded, settings, checkpoint.parent / stem, title)
        report[protocol] = section
        metrics.update(scores)
        plots.append(plot)
    report["metrics"] = metrics
    report["wall_s"] = time.time() - t0
    path = checkpoint.parent / f"{stem}.json"
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    run_id = log_eval_to_mlflow(checkpoint, metrics, loaded.step, [path, *plots]) if track else None
    return ContinualResult(path=path, metrics=metrics, plots=plots, mlflow_run_id=run_id)


def _domain_protocol(loaded, settings: ContinualSettings, stem: Path, title: str):
    """Fine-tune domain after domain; the perplexity matrix per reading mode. Returns (report, metrics, plot)."""
    from tqdm.auto import tqdm

    from nlplatform.eval.long_context_suite import heldout_tokens

    recipe, tok, model = loaded.recipe, loaded.tokenizer, loaded.model
    seq_len = recipe.data.seq_len
    train_streams, eval_windows = {}, {}
    for i, domain in enumerate(settings.domains):
        train_docs, held_docs = split_documents(domain_texts(domain), settings.seed + i)
        train_streams[domain] = stream(train_docs, tok.encode, tok.eot_id)
        eval_windows[domain] = _windows(stream(held_docs, tok.encode, tok.eot_id), seq_len, settings.eval_windows,
                                        f"the held-out part of domain {domain!r}")  # fmt: skip
    corpus = torch.tensor(heldout_tokens(loaded), dtype=torch.long)
    eval_windows["corpus"] = _windows(corpus, seq_len, settings.eval_windows, "the checkpoint corpus's test split")
    columns = [*settings.domains, "corpus"]

    losses: dict[str, list[list[float]]] = {mode: [] for mode in settings.modes}
    stage_loss: list[float] = []
    stages = ["start", *settings.domains]
    for stage, name in enumerate(tqdm(stages, desc="continual: domain stages", unit="stage")):
        if stage > 0:
            stage_loss.append(finetune(model, train_streams[name], recipe, settings, settings.seed + stage))
        for mode in settings.modes:
            losses[mode].append([held_out_loss(model, eval_windows[c], mode) for c in columns])

    metrics: dict[str, float] = {}
    matrices = {}
    T = len(settings.domains)
    for mode in settings.modes:
        ppl = [[math.exp(x) for x in row] for row in losses[mode]]
        matrices[mode] = ppl
        square = [row[:T] for row in ppl[1:]]
        scores = continual_scores(square, higher_is_better=False, baseline=ppl[0][:T])
        scores["corpus_ppl_start"] = ppl[0][T]
        scores["corpus_ppl_end"] = ppl[-1][T]
        metrics.update({f"eval/continual/{mode}/{k}": v for k, v in scores.items()})
    rows = [s if s == "start" else f"after {s}" for s in stages]
    plot = plot_matrices(matrices, rows, columns, stem.with_name(f"{stem.name}-matrix.png"),
                         f"continual learning, domains: {title}", "perplexity")  # fmt: skip
    section = {"stages": stages, "columns": columns, "perplexity": matrices, "stage_final_train_loss": stage_loss}
    return section, metrics, plot


def _class_protocol(loaded, settings: ContinualSettings, stem: Path, title: str):
    """Class-incremental intent classification; the accuracy matrices. Returns (report, metrics, plot)."""
    from tqdm.auto import tqdm

    from nlplatform.eval.class_incremental import run_class_incremental

    recipe = loaded.recipe
    with tqdm(total=len(settings.class_tasks), desc="continual: class stages", unit="stage") as bar:
        section = run_class_incremental(
            loaded.model,
            loaded.tokenizer,
            settings.class_tasks,
            lambda model, tokens, targets, seed: finetune(model, tokens, recipe, settings, seed, targets),
            train_per_label=settings.train_per_label,
            test_per_label=settings.test_per_label,
            seq_len=recipe.data.seq_len,
            seed=settings.seed,
            progress=bar,
        )
    metrics = {f"eval/continual/{kind}/{k}": v for kind, scores in section["scores"].items() for k, v in scores.items()}
    rows = [f"after {t}" for t in settings.class_tasks]
    plot = plot_matrices(section["accuracy"], rows, list(settings.class_tasks),
                         stem.with_name(f"{stem.name}-classes.png"), f"class-incremental intents: {title}",
                         "accuracy")  # fmt: skip
    return section, metrics, plot


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


def plot_matrices(matrices: dict[str, list[list[float]]], rows, columns, path: Path, title: str, what: str) -> Path:
    """One heatmap per matrix (reading mode or class setting): ``what`` is ``perplexity`` (log colour scale, lower is
    better) or ``accuracy`` (0 to 1, higher is better; NaN cells, tasks not learned yet, left blank)."""
    from matplotlib.colors import LogNorm, Normalize

    from nlplatform.plots import pyplot

    plt = pyplot()
    names = list(matrices)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 0.6 * len(rows) + 2.2), dpi=120,
                             squeeze=False)  # fmt: skip
    ppl = what == "perplexity"
    for ax, name in zip(axes[0], names):
        grid = matrices[name]
        norm = LogNorm() if ppl else Normalize(0.0, 1.0)
        image = ax.imshow(grid, cmap="RdYlGn_r" if ppl else "RdYlGn", norm=norm, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.1f}" if ppl else f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(columns)), columns, rotation=20)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("held-out domain" if ppl else "test task")
        ax.set_title(f"{what}, {name.replace('_', '-')}", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
