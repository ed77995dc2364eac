"""Tokenizers: bytes, trained-and-cached BPE, and tokenizer.json files."""

from __future__ import annotations

import pytest

from nlplatform.data import tokenizer as tokenizer_module
from nlplatform.data.tokenizer import build_tokenizer, load_tokenizer
from nlplatform.errors import UserError

SAMPLES = [
    "plain ascii text.",
    "ünïcödé, naïve café, 日本語のテキスト, Ελληνικά",
    "emoji 🦊🤖👩‍👩‍👧 and flags 🇫🇷 and a zero-width\u200bjoiner",
    "  leading spaces, tabs\tand\r\nwindows newlines\n\n",
    "",
]


def test_bytes_tokenizer_round_trips_unicode_with_vocab_257_and_eot_256(tmp_path):
    """The byte tokenizer maps text to its UTF-8 bytes and back exactly; vocab 257, end-of-text 256."""
    tok = build_tokenizer("bytes", [], tmp_path, 300)
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_bytes_decode_replaces_invalid_bytes_and_shows_eot(tmp_path):
    """Decoding a cut-off multi-byte character gives U+FFFD instead of failing; id 256 reads as <|endoftext|>."""
    tok = build_tokenizer("bytes", [], tmp_path, 300)
    assert tok.decode([0xF0, 0x9F, 104, 256, 105]) == "\ufffdh<|endoftext|>i"


def test_bpe_round_trips_unicode_and_has_the_requested_vocab(tmp_path, make_docs):
    """A BPE trained on generated text round-trips arbitrary unicode (even unseen characters) with vocab 300."""
    tok = build_tokenizer("bpe", make_docs(20), tmp_path, 300)
    assert tok.vocab_size == 300
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    doc = make_docs(1, seed=5)[0]
    assert len(tok.encode(doc)) < len(doc.encode("utf-8"))  # merges were learned and are used


def test_bpe_is_cached_and_reused_for_the_same_train_split(tmp_path, make_docs, monkeypatch):
    """A second build on the same train documents loads the cached file instead of training again."""
    docs = make_docs(20)
    first = build_tokenizer("bpe", docs, tmp_path, 300)
    cached = list((tmp_path / "tokenizers").glob("bpe-*-300.json"))
    assert len(cached) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    second = build_tokenizer("bpe", docs, tmp_path, 300)
    assert second.fingerprint == first.fingerprint
    assert second.encode(docs[0]) == first.encode(docs[0])


def test_saved_tokenizer_json_loads_as_file_spec(tmp_path, make_docs):
    """Tokenizer.save writes tokenizer.json and returns a file: spec that reloads the same tokenizer."""
    tok = build_tokenizer("bpe", make_docs(20), tmp_path, 300)
    spec = tok.save(tmp_path / "saved")
    assert spec == f"file:{(tmp_path / 'saved' / 'tokenizer.json').resolve()}"
    for loaded in (load_tokenizer(spec), build_tokenizer(spec, [], tmp_path, 300)):
        assert (loaded.vocab_size, loaded.eot_id, loaded.fingerprint) == (tok.vocab_size, tok.eot_id, tok.fingerprint)
        assert loaded.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])
    assert build_tokenizer("bytes", [], tmp_path, 300).save(tmp_path / "b") == "bytes"


def test_garbage_tokenizer_file_is_a_user_error(tmp_path):
    """A file: spec pointing at something that is not tokenizer JSON raises UserError."""
    path = tmp_path / "tokenizer.json"
    path.write_text("this is not json {", encoding="utf-8")
    with pytest.raises(UserError, match="not a Hugging Face tokenizers file"):
        load_tokenizer(f"file:{path}")


def test_missing_tokenizer_file_is_a_user_error(tmp_path):
    """A file: spec pointing nowhere raises UserError naming the path."""
    with pytest.raises(UserError, match="tokenizer file not found"):
        build_tokenizer(f"file:{tmp_path / 'absent.json'}", [], tmp_path, 300)


def test_tokenizer_file_without_end_of_text_token_is_a_user_error(tmp_path):
    """A tokenizer with none of the known end-of-text tokens is refused, listing what was looked for."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    path = tmp_path / "tokenizer.json"
    HFTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(UserError, match=r"no end-of-text token.*</s>"):
        load_tokenizer(f"file:{path}")


def test_bpe_trains_on_a_bounded_deterministic_spread_of_the_train_split(tmp_path, make_docs):
    """Below the budget every document is used (the default corpus keeps its tokenizer); above it, every k-th
    document for the smallest power of two k that fits, read in one pass of a stream, the same each time; the sample
    size is part of the cache key."""
    from nlplatform.data.tokenizer import DEFAULT_SAMPLE_BYTES, bpe_sample, tokenizer_key

    docs = make_docs(40)
    size = sum(len(d.encode()) for d in docs)
    assert bpe_sample(docs, size) == docs
    budget = size // 4 + 1  # a quarter: every 4th document (a power of two: the stride doubles until it fits)
    sample = bpe_sample(iter(docs), budget)
    assert sample == docs[::4] and sample == bpe_sample(docs, budget)
    assert sum(len(d.encode()) for d in sample) <= budget
    assert bpe_sample(docs, size // 5) == docs[::8]
    small = build_tokenizer("bpe", docs, tmp_path, 300, sample_bytes=budget)
    assert small.backend.to_str() == build_tokenizer("bpe", docs[::4], tmp_path / "other", 300).backend.to_str()
    assert tokenizer_key("bpe", 300) == "bpe-300" == tokenizer_key("bpe", 300, DEFAULT_SAMPLE_BYTES)
    assert tokenizer_key("bpe", 300, 1000) == "bpe-300-sample1000"
