"""The task YAMLs and suites under ``evals/``, made concrete for this machine and this checkpoint.

The YAMLs in ``evals/tasks/`` include lm-eval's own task files (its prompts and metrics) and only point them at
the offline data. They hold two kinds of placeholders that depend on the machine: ``{lm_eval_tasks}`` (the
installed lm-eval's task folder) and ``{data:NAME}`` (an absolute data path). ``render_tasks`` writes filled copies
into a cache folder that lm-eval's ``TaskManager(include_path=...)`` reads. ``heldout_corpus`` reads pages of the
test split of the checkpoint's own training corpus (``write_heldout_pages``). ``prepare_tasks`` does both: the data
paths of the tasks asked for, then the YAMLs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import yaml

from nlplatform.config import DataConfig
from nlplatform.data import atomic_write_text
from nlplatform.errors import UserError
from nlplatform.validate import check_name

EVALS = Path(__file__).resolve().parents[3] / "evals"
TASKS_DIR = EVALS / "tasks"
SUITES_DIR = EVALS / "suites"
PAGE_CHARS = 20_000  # held-out documents are cut into pages of at most this many characters (WikiText-page sized)
_DATA = re.compile(r"\{data:([a-z_]+)\}")


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: list[str]
    num_fewshot: int = 0
    limit: int | None = None  # items per task; None = all
    page_chars: int = PAGE_CHARS  # held-out corpus documents are scored in pages of at most this many characters


def task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name: str) -> Suite:
    """The suite ``evals/suites/<name>.yaml``; an unknown name or task is a UserError with a hint."""
    path = SUITES_DIR / f"{name}.yaml"
    if not path.is_file():
        check_name(name, suite_names(), "suite", "Suites")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(spec) - {"tasks", "num_fewshot", "limit", "page_chars"})
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (known: tasks, num_fewshot, limit, page_chars)")
    suite = Suite(
        name,
        list(spec.get("tasks") or []),
        int(spec.get("num_fewshot") or 0),
        spec.get("limit"),
        int(spec.get("page_chars") or PAGE_CHARS),
    )
    check_tasks(suite.tasks)
    return suite


def check_tasks(tasks: list[str]) -> None:
    known = task_names()
    if not tasks:
        raise UserError("no tasks to evaluate")
    for task in tasks:
        check_name(task, known, "task", "Tasks")


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def render_tasks(out_dir: Path, data_files: dict[str, Path]) -> Path:
    """Write every task YAML into ``out_dir`` with its placeholders filled; return ``out_dir``.

    ``data_files`` maps a data name (``piqa``, ``lambada``, ``heldout_corpus``, ...) to an absolute path; a task
    whose data is not given is left out.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    lm_tasks = str(lm_eval_tasks_dir())
    for template in sorted(TASKS_DIR.glob("*.yaml")):
        text = template.read_text().replace("{lm_eval_tasks}", lm_tasks)
        needed = _DATA.findall(text)
        if any(name not in data_files for name in needed):
            continue
        text = _DATA.sub(lambda m: str(Path(data_files[m.group(1)]).resolve()), text)
        atomic_write_text(out_dir / template.name, text)
    return out_dir


def pages(text: str, page_chars: int = PAGE_CHARS) -> list[str]:
    """Cut a document into pages of at most ``page_chars`` characters at paragraph breaks (blank lines), or at the
    last whitespace when one paragraph is longer than a page. The pages joined with blank lines give the text back
    up to whitespace at the cuts."""
    out: list[str] = []
    current = ""
    for para in re.split(r"\n\s*\n", text.strip()):
        para = para.strip()
        while len(para) > page_chars:  # a paragraph longer than a page: cut it at whitespace
            cut = para.rfind(" ", 0, page_chars)
            cut = cut if cut > 0 else page_chars
            if current:
                out.append(current)
                current = ""
            out.append(para[:cut].strip())
            para = para[cut:].strip()
        if not para:
            continue
        if current and len(current) + 2 + len(para) > page_chars:
            out.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


def write_heldout_pages(data: DataConfig, out_path: Path, page_chars: int = PAGE_CHARS) -> Path:
    """The test split of the corpus ``data`` describes (the same split training held out), as JSON lines
    ``{"page": ...}`` for the ``heldout_corpus`` task."""
    from nlplatform.eval.checkpoint import heldout_documents

    lines = [json.dumps({"page": page}) for doc in heldout_documents(data) for page in pages(doc, page_chars)]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    return out_path


def prepare_tasks(
    out_dir: Path, data: DataConfig | None, tasks: Collection[str] | None = None, page_chars: int = PAGE_CHARS
) -> Path:
    """Render the task YAMLs of ``tasks`` (None: every task) into ``out_dir`` with this machine's data paths: the
    offline eval data (fetched on first use) and, given the checkpoint's corpus ``data``, its held-out pages for
    ``heldout_corpus``. Returns ``out_dir``, the folder for lm-eval's ``include_path``."""
    from nlplatform.eval.harness.data import DATASETS, dataset_file, require_eval_data

    wanted = set(DATASETS) if tasks is None else {"lambada" if t == "lambada_openai" else t for t in tasks}
    files: dict[str, Path] = {}
    if wanted & set(DATASETS):
        root = require_eval_data()
        files.update({name: dataset_file(name, root) for name in wanted & set(DATASETS)})
    if data is not None and (tasks is None or "heldout_corpus" in tasks):
        files["heldout_corpus"] = write_heldout_pages(data, out_dir / "heldout_corpus.jsonl", page_chars)
    return render_tasks(out_dir, files)
