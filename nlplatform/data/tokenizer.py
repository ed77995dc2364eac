"""Tokenizers: raw UTF-8 bytes, a byte-level BPE trained on the train split, or any ``tokenizer.json`` file.

All three sit behind one small ``Tokenizer`` class, so packing, training and generation never ask which kind they
hold. Every tokenizer has an end-of-text id, written after each document when the corpus is packed.

Specs (the ``data.tokenizer`` values): ``bytes``; ``bpe`` (trained, cached under
``<root>/tokenizers/bpe-<train-split fingerprint>-<vocab>.json``); ``file:PATH`` (a Hugging Face ``tokenizers``
JSON file). ``Tokenizer.save(dir)`` returns the spec that reloads a tokenizer with ``load_tokenizer``.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nlplatform.data import atomic_write_text
from nlplatform.errors import UserError

EOT_TOKEN = "<|endoftext|>"
# End-of-text tokens of common tokenizer families, in order of preference, for tokenizers loaded from files.
EOT_CANDIDATES = (
    "<|endoftext|>",
    "</s>",
    "<eos>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "[SEP]",
    "<EOS>",
    "[EOS]",
)
BYTES_VOCAB = 257  # 256 byte values + end-of-text
BYTES_EOT = 256


class Tokenizer:
    """Raw bytes (``backend is None``) or a wrapped ``tokenizers.Tokenizer``.

    Attributes: ``name`` (a label for logs), ``vocab_size`` (ids are ``< vocab_size``), ``eot_id`` and
    ``fingerprint`` (changes whenever the id mapping changes; used in cache keys).
    """

    def __init__(self, backend: Any = None, *, name: str = "bytes", eot_id: int | None = None) -> None:
        self.backend = backend
        self.name = name
        if backend is None:
            self.vocab_size = BYTES_VOCAB
            self.eot_id = BYTES_EOT
            self.fingerprint = "bytes"
            return
        if eot_id is None:
            raise ValueError("a tokenizers-backed Tokenizer needs its eot_id")
        # Documents are packed as they are: no truncation, no padding, no BOS/EOS added by a post-processor.
        backend.no_truncation()
        backend.no_padding()
        vocab = backend.get_vocab(with_added_tokens=True)
        # Ids can have holes; the embedding must cover the largest one.
        self.vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=0) + 1)
        self.eot_id = int(eot_id)
        self.fingerprint = hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    def encode(self, text: str) -> list[int]:
        if self.backend is None:
            return list(text.encode("utf-8"))
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.backend is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode_batch`` as integer arrays, without Python lists of bytes: the fast path used for packing."""
        if self.backend is None:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; end-of-text shows as ``<|endoftext|>``, invalid bytes as U+FFFD."""
        ids = [int(i) for i in ids]
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=False)
        pieces: list[str] = []
        run = bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            pieces.append(run.decode("utf-8", errors="replace"))
            run.clear()
            pieces.append(EOT_TOKEN if i == BYTES_EOT else "\ufffd")
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def backend_json(self) -> str:
        """This tokenizer as a Hugging Face ``tokenizers`` JSON, bytes included: ``transformers.AutoTokenizer`` (as
        ``PreTrainedTokenizerFast``) loads it with the same ids. Bytes become a byte-level BPE without merges whose
        vocabulary maps each byte's ByteLevel symbol to the byte's value, and ``<|endoftext|>`` to 256."""
        return (self.backend or _bytes_backend()).to_str(pretty=True)

    def save(self, folder: str | Path) -> str:
        """Write what reloading needs into ``folder``; return the spec for ``load_tokenizer``.

        Bytes need no file (``"bytes"``); others write ``tokenizer.json`` and return ``"file:<abs path>"``.
        """
        if self.backend is None:
            return "bytes"
        path = Path(folder) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.backend.to_str(pretty=True))
        return f"file:{path.resolve()}"


# The text a BPE tokenizer is trained on, at most: every document of a smaller train split (the default corpus is
# 5.06 MB, so its tokenizer is the one trained on all of it), a deterministic spread of documents of a larger one.
# Measured: training on 128 MB of synthetic text (50,000 distinct words) peaks at 0.23 GB resident, 18 s on 2 cores.
DEFAULT_SAMPLE_BYTES = 64_000_000


def bpe_sample(docs: Iterable[str], max_bytes: int) -> list[str]:
    """At most ``max_bytes`` of UTF-8 text from the stream ``docs``: all of it when it fits, else every k-th document
    for the smallest power of two k that fits (one pass: k doubles, dropping every other kept document, whenever the
    kept text outgrows the budget), so the sample spreads over the whole split, is the same on every rank and every
    run, and never holds more than the budget."""
    kept: list[tuple[int, str, int]] = []
    stride, size = 1, 0
    for i, doc in enumerate(docs):
        if i % stride:
            continue
        n = len(doc.encode("utf-8"))
        kept.append((i, doc, n))
        size += n
        while size > max_bytes and len(kept) > 1:
            stride *= 2
            kept = [item for item in kept if item[0] % stride == 0]
            size = sum(item[2] for item in kept)
    return [doc for _, doc, _ in kept]


def build_tokenizer(
    spec: str, train_docs: Iterable[str], root: Path, bpe_vocab_size: int, sample_bytes: int = DEFAULT_SAMPLE_BYTES
) -> Tokenizer:
    """The tokenizer ``spec`` names; ``bpe`` is trained on a bounded sample of the train documents (``bpe_sample``;
    a lazy stream is read only when a bpe tokenizer is built) or reused."""
    if spec == "bytes":
        return Tokenizer()
    if spec == "bpe":
        return _bpe(bpe_sample(train_docs, sample_bytes), Path(root), bpe_vocab_size)
    if spec.startswith("file:"):
        return load_tokenizer(spec)
    raise UserError(f"data.tokenizer must be 'bytes', 'bpe' or 'file:PATH', got {spec!r}")


def load_tokenizer(spec: str, name: str | None = None) -> Tokenizer:
    """Reload a tokenizer from a spec returned by ``Tokenizer.save``: ``bytes`` or ``file:PATH``."""
    if spec == "bytes":
        return Tokenizer()
    if spec.startswith("file:"):
        path = tokenizer_file(spec)
        return _from_file(path, name or f"file:{path.name}")
    raise UserError(f"cannot load tokenizer {spec!r}: expected 'bytes' or 'file:PATH' (a tokenizer.json)")


def tokenizer_file(spec: str) -> Path:
    """The ``tokenizer.json`` a ``file:`` spec points at (a folder means its ``tokenizer.json``); must exist."""
    path = Path(spec[len("file:") :]).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path} (from data.tokenizer={spec})")
    return path.resolve()


def tokenizer_key(spec: str, bpe_vocab_size: int, sample_bytes: int = DEFAULT_SAMPLE_BYTES) -> str:
    """What identifies the tokenizer ``spec`` will produce, computable before building it (a cache-key part).

    ``bpe`` is determined by the train split (keyed separately) and the vocabulary size; a file by its content.
    """
    if spec == "bytes":
        return "bytes"
    if spec == "bpe":  # the default sample keeps the key caches were built under before the sample existed
        return f"bpe-{bpe_vocab_size}" + ("" if sample_bytes == DEFAULT_SAMPLE_BYTES else f"-sample{sample_bytes}")
    if spec.startswith("file:"):
        return "file-" + hashlib.sha256(tokenizer_file(spec).read_bytes()).hexdigest()[:16]
    raise UserError(f"data.tokenizer must be 'bytes', 'bpe' or 'file:PATH', got {spec!r}")


def _from_file(path: Path, name: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
        raise UserError(f"{path} is not a Hugging Face tokenizers file (tokenizer.json): {first}") from None
    for token in EOT_CANDIDATES:
        eot = backend.token_to_id(token)
        if eot is not None:
            return Tokenizer(backend, name=name, eot_id=eot)
    raise UserError(
        f"{path} has no end-of-text token (looked for {', '.join(EOT_CANDIDATES)}); documents are separated by one "
        f"when packed, so add one of them to the tokenizer's special tokens"
    )


def _bpe(train_docs: Sequence[str], root: Path, vocab_size: int) -> Tokenizer:
    """Train (or reuse) a byte-level BPE on the train documents; cached by their content and the vocab size."""
    from nlplatform.data.corpus import documents_fingerprint

    path = root / "tokenizers" / f"bpe-{documents_fingerprint(train_docs)}-{vocab_size}.json"
    if path.is_file():
        try:
            return _from_file(path, f"bpe-{vocab_size}")
        except UserError:
            pass  # a damaged cache entry: train again and overwrite it
    backend = train_bpe(train_docs, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, backend.to_str(pretty=True))
    return Tokenizer(backend, name=f"bpe-{vocab_size}", eot_id=backend.token_to_id(EOT_TOKEN))


def _byte_symbols() -> dict[int, str]:
    """The ByteLevel pre-tokenizer's symbol for each byte: printable Latin-1 bytes stand for themselves, the other
    bytes take the code points from 256 on, in byte order (the GPT-2 byte-to-unicode table)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _bytes_backend() -> Any:
    """The bytes tokenizer as a ``tokenizers.Tokenizer``: ids 0-255 the UTF-8 bytes, 256 end-of-text."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {symbol: b for b, symbol in _byte_symbols().items()}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(EOT_TOKEN, special=True)])
    return backend


def train_bpe(docs: Sequence[str], vocab_size: int) -> Any:
    """A ``tokenizers.Tokenizer``: byte-level BPE with ``<|endoftext|>`` (id 0), trained on ``docs``.

    The ByteLevel pre-tokenizer maps every byte to a visible symbol and the whole 256-symbol alphabet is seeded,
    so any text encodes without an unknown token and decodes back exactly (no prefix space is added).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    large = sum(len(d) for d in docs) > 20_000_000
    print(f"nlplatform: training a byte-level BPE tokenizer (vocab {vocab_size}) on the train split", file=sys.stderr)
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=large,
    )
    backend.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return backend
