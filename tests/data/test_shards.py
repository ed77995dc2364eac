"""Token shards: written by the preparation pipeline, read back across shard boundaries, refused when damaged."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle

import numpy as np
import pytest
import torch

from nlplatform.data.corpus import Corpus
from nlplatform.data.packing import ResumableSampler, TokenWindows
from nlplatform.data.prepare import encode_documents, write_splits
from nlplatform.data.shards import TokenShards, read_counts, read_index, token_dtype, verify_checksums
from nlplatform.data.tokenizer import Tokenizer
from nlplatform.errors import UserError


def corpus_of(docs: list[str], per_batch: int = 3) -> Corpus:
    return Corpus(len(docs), lambda: (docs[i : i + per_batch] for i in range(0, len(docs), per_batch)))


def literal_stream(docs: list[str], tok: Tokenizer) -> list[int]:
    return [i for d in docs for i in [*tok.encode(d), tok.eot_id]]


def write(tmp_path, docs, *, rule=lambda i: "train", shard_tokens=1 << 20, **kwargs):
    return write_splits(corpus_of(docs), rule, Tokenizer(), tmp_path, num_proc=1, shard_tokens=shard_tokens, **kwargs)


def test_each_document_is_followed_by_end_of_text_in_corpus_order_per_split(tmp_path):
    """Every split's stream is its documents' tokens, each followed by end-of-text, in corpus order; the index counts
    documents and tokens, the saved counts are the stream's, the document ends are where each one stops."""
    tok = Tokenizer()
    docs = ["ab", "ü🦊", "c", "hello world", "x" * 40, "yz"]
    splits = ["train", "val", "train", "test", "train", "val"]
    indexes = write(tmp_path, docs, rule=lambda i: splits[i], shard_tokens=7)
    for split in ("train", "val", "test"):
        mine = [d for d, s in zip(docs, splits) if s == split]
        expected = literal_stream(mine, tok)
        shards = TokenShards(tmp_path, split)
        assert shards.dtype == np.uint16 and shards[0 : len(shards)].tolist() == expected
        assert indexes[split]["num_documents"] == len(mine) and indexes[split]["num_tokens"] == len(expected)
        assert np.array_equal(read_counts(tmp_path, split), np.bincount(expected, minlength=tok.vocab_size))
        ends = np.fromfile(tmp_path / f"{split}.docs.bin", dtype="<u8").tolist()
        assert ends == list(itertools.accumulate(len(tok.encode(d)) + 1 for d in mine))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_large_vocabularies_use_uint32():
    """Token files are uint16 up to 65,536 ids and uint32 beyond."""
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_a_corpus_of_many_small_shards_reads_back_whole_and_windows_cross_shard_boundaries(tmp_path):
    """With shards of 10 tokens, every slice of the stream (inside a shard, across one or several boundaries) equals
    the literal stream, and so does every training window."""
    tok = Tokenizer()
    docs = [f"document number {i} " * (1 + i % 3) for i in range(30)]
    write(tmp_path, docs, shard_tokens=10)
    expected = np.array(literal_stream(docs, tok))
    index = read_index(tmp_path, "train")
    assert len(index["shards"]) == -(-len(expected) // 10) and all(s["tokens"] <= 10 for s in index["shards"])
    shards = TokenShards(tmp_path, "train")
    rng = np.random.default_rng(0)
    for a, b in [(0, 10), (5, 15), (9, 31), (0, len(expected))] + [
        tuple(sorted(rng.integers(0, 900, 2))) for _ in range(50)
    ]:
        assert shards[a:b].tolist() == expected[a:b].tolist()
    windows, reference = TokenWindows(shards, 16), TokenWindows(expected.astype(np.uint16), 16)
    assert len(windows) == len(reference)
    assert all(
        torch.equal(windows[i][0], reference[i][0]) and torch.equal(windows[i][1], reference[i][1])
        for i in range(len(windows))
    )
    verify_checksums(tmp_path, "train")


def test_a_document_larger_than_a_shard_continues_in_the_next_ones(tmp_path):
    """One document of 1,000 tokens with shards of 64 spans 16 shards and reads back intact; the documents around it
    are unaffected."""
    tok = Tokenizer()
    docs = ["before", "".join(chr(97 + i % 26) for i in range(999)), "after"]
    write(tmp_path, docs, shard_tokens=64)
    shards = TokenShards(tmp_path, "train")
    assert len(read_index(tmp_path, "train")["shards"]) == -(-len(shards) // 64) > 15
    assert shards[0 : len(shards)].tolist() == literal_stream(docs, tok)


def test_resuming_mid_shard_gives_the_uninterrupted_batches(tmp_path):
    """A sampler restarted at any position of the stream (mid-shard, mid-epoch) yields the windows the uninterrupted
    one yields from there, read across shard boundaries."""
    docs = [f"{i} lorem ipsum dolor sit amet " * 3 for i in range(40)]
    write(tmp_path, docs, shard_tokens=50)
    windows = TokenWindows(TokenShards(tmp_path, "train"), 32)
    stream = list(itertools.islice(iter(ResumableSampler(len(windows), seed=5)), 3 * len(windows)))
    for start in (7, len(windows) + 3):
        resumed = list(itertools.islice(iter(ResumableSampler(len(windows), seed=5, start=start)), 20))
        assert resumed == stream[start : start + 20]
        assert all(torch.equal(windows[a][0], windows[b][0]) for a, b in zip(resumed, stream[start:]))


def test_shards_pickle_as_their_folder_not_their_data(tmp_path):
    """DataLoader workers receive the folder and reopen the files; nothing of the tokens is pickled."""
    write(tmp_path, ["x" * 5000], shard_tokens=1000)
    windows = TokenWindows(TokenShards(tmp_path, "train"), 8)
    windows[3]  # opens a file descriptor
    blob = pickle.dumps(windows)
    assert len(blob) < 1000
    clone = pickle.loads(blob)
    assert all(torch.equal(a, b) for a, b in zip(clone[400], windows[400]))


def test_max_tokens_stops_before_the_first_document_that_starts_after_the_cap(tmp_path):
    docs = ["a" * 9] * 10  # 10 tokens each with end-of-text
    indexes = write(tmp_path, docs, max_tokens=35)
    assert indexes["train"]["num_tokens"] == 40 and indexes["train"]["num_documents"] == 4


def test_workers_write_the_same_tokens_as_one_process(tmp_path, monkeypatch):
    """Tokenising with a BPE in 2 worker processes (from the first batch on) gives the stream one process gives."""
    from nlplatform.data import prepare
    from nlplatform.data.tokenizer import build_tokenizer

    docs = [f"doc {i} " + "word " * (i % 50) for i in range(400)]
    tok = build_tokenizer("bpe", docs, tmp_path / "tokenizers", 300)
    monkeypatch.setattr(prepare, "_BATCH_CHARS", 500)
    monkeypatch.setattr(prepare, "_INLINE_CHARS", 0)
    started = []

    class CountedPool(prepare.ProcessPoolExecutor):
        def __init__(self, workers, **kwargs):
            started.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(prepare, "ProcessPoolExecutor", CountedPool)
    rule = lambda i: "val" if i % 5 == 0 else "train"  # noqa: E731
    write_splits(corpus_of(docs, 7), rule, tok, tmp_path, num_proc=2)
    for split, mine in (("train", [d for i, d in enumerate(docs) if i % 5]), ("val", docs[::5])):
        shards = TokenShards(tmp_path, split)
        assert shards[0 : len(shards)].tolist() == literal_stream(mine, tok)
    assert started == [2]
    (tmp_path / "bytes").mkdir()
    write_splits(corpus_of(docs, 7), rule, Tokenizer(), tmp_path / "bytes", num_proc=2)
    assert started == [2]  # the byte tokenizer is a copy: it starts no workers


def test_encode_documents_marks_each_documents_end():
    tokens, ends = encode_documents(Tokenizer(), ["ab", "", "c"])
    assert tokens.tolist() == [97, 98, 256, 256, 99, 256] and ends.tolist() == [3, 4, 6]


# ------------------------------------------------------------------------------------------- damaged caches


def test_a_missing_shard_is_one_clear_error(tmp_path):
    write(tmp_path, ["some text " * 50], shard_tokens=100)
    (tmp_path / "train-00002.bin").unlink()
    with pytest.raises(UserError, match=r"damaged \(shard train-00002.bin is missing\); delete the folder"):
        TokenShards(tmp_path, "train")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda index: "{not json", "not a valid index"),
        (lambda index: json.dumps({**index, "num_tokens": index["num_tokens"] + 1}), "lists shards of"),
        (lambda index: json.dumps({**index, "shards": [{**index["shards"][0], "tokens": 3}]}), "lists shards of"),
        (lambda index: json.dumps({**index, "shards": [{**index["shards"][0], "file": "../x.bin"}]}), "outside"),
        (lambda index: json.dumps({k: v for k, v in index.items() if k != "dtype"}), "not a valid index"),
    ],
)
def test_a_corrupt_index_is_one_clear_error(tmp_path, damage, message):
    write(tmp_path, ["some text " * 5])
    path = tmp_path / "train.json"
    path.write_text(damage(json.loads(path.read_text())))
    with pytest.raises(UserError, match=message):
        TokenShards(tmp_path, "train")


def test_a_shard_whose_bytes_changed_fails_its_checksum(tmp_path):
    write(tmp_path, ["some text " * 50], shard_tokens=100)
    shard = tmp_path / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    TokenShards(tmp_path, "train")  # sizes still agree
    with pytest.raises(UserError, match="does not match its checksum"):
        verify_checksums(tmp_path, "train")
    assert hashlib.sha256(bytes(data)).hexdigest() != read_index(tmp_path, "train")["shards"][1]["sha256"]
