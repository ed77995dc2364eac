"""Token shards: how a prepared split is stored and read back.

A split (``train``, ``val``, ``test``) is its documents' tokens, each followed by the end-of-text id, concatenated
and cut into shards of at most ``shard_tokens`` tokens (``train-00000.bin``, ...: raw little-endian ``uint16``, or
``uint32`` above 65,536 ids). A shard boundary falls anywhere, inside a document too, so a document longer than a
shard simply continues in the next one. Beside the shards:

- ``<split>.json``, the index: dtype, token and document counts, the tokenizer's fingerprint and, per shard, its file,
  token count and sha256;
- ``<split>.docs.bin``: the end offset of every document in the split's token stream (``uint64``), for tools that
  need document boundaries (training reads windows across them);
- ``<split>.counts.npy``: the count of every token id, so the unigram baseline never scans the tokens.

Reading (``TokenShards``) never maps or loads a whole shard: a slice of the token stream is read with ``pread`` from
the shard files that hold it, so a rank's resident memory stays the same whether it reads a 5 MB corpus or a 60 GB
one, and whichever windows of the global stream it is given.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nlplatform.errors import UserError
from nlplatform.files import atomic_write_text

SHARD_TOKENS = 1 << 28  # tokens per shard: 512 MB of uint16, few enough files for 100B tokens (about 400 per split)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def index_file(folder: Path, split: str) -> Path:
    return Path(folder) / f"{split}.json"


def counts_file(folder: Path, split: str) -> Path:
    return Path(folder) / f"{split}.counts.npy"


def docs_file(folder: Path, split: str) -> Path:
    return Path(folder) / f"{split}.docs.bin"


class ShardWriter:
    """Appends documents' tokens to one split's shards in ``folder`` (a staging folder: files are complete once
    ``close`` returns, fsynced, and the folder is published by the caller). Memory: one shard's hash state and the
    token counts, whatever the split's size."""

    def __init__(
        self,
        folder: Path,
        split: str,
        *,
        vocab_size: int,
        eot_id: int,
        tokenizer: str,
        shard_tokens: int = SHARD_TOKENS,
    ) -> None:
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be > 0, got {shard_tokens}")
        self.folder, self.split = Path(folder), split
        self.dtype = token_dtype(vocab_size).newbyteorder("<")
        self.vocab_size, self.eot_id, self.tokenizer = vocab_size, eot_id, tokenizer
        self.shard_tokens = int(shard_tokens)
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.num_tokens = self.num_documents = 0
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._hash = None
        self._in_shard = 0
        self._docs = docs_file(self.folder, split).open("wb")

    def _open_shard(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = (self.folder / name).open("wb")
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0, "sha256": None})

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())
        self._file = None

    def write(self, tokens: np.ndarray, doc_ends: np.ndarray) -> None:
        """Append ``tokens`` (whole documents, end-of-text ids included) whose documents end at ``doc_ends``
        (offsets into ``tokens``, increasing, the last one ``len(tokens)``)."""
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        self.counts += np.bincount(tokens, minlength=self.vocab_size)[: self.vocab_size]
        (np.asarray(doc_ends, dtype=np.uint64) + np.uint64(self.num_tokens)).astype("<u8").tofile(self._docs)
        self.num_documents += len(doc_ends)
        self.num_tokens += len(tokens)
        start = 0
        while start < len(tokens):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._close_shard()
                self._open_shard()
            piece = tokens[start : start + self.shard_tokens - self._in_shard]
            data = piece.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_shard += len(piece)
            start += len(piece)

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write the counts and the index; return the index."""
        self._close_shard()
        self._docs.flush()
        os.fsync(self._docs.fileno())
        self._docs.close()
        with counts_file(self.folder, self.split).open("wb") as f:
            np.save(f, self.counts)
            f.flush()
            os.fsync(f.fileno())
        index = {
            "dtype": self.dtype.name,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "tokenizer": self.tokenizer,
            "shards": self.shards,
        }
        atomic_write_text(index_file(self.folder, self.split), json.dumps(index, indent=1) + "\n")
        return index


def _damaged(folder: Path, what: str) -> UserError:
    return UserError(f"the token cache {folder} is damaged ({what}); delete the folder to prepare it again")


def read_index(folder: Path, split: str) -> dict[str, Any]:
    """The index of ``split`` in ``folder``, checked against the shard files on disk (names and sizes)."""
    folder = Path(folder)
    path = index_file(folder, split)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        dtype = np.dtype(index["dtype"])
        shards = [(str(s["file"]), int(s["tokens"])) for s in index["shards"]]
        total = int(index["num_tokens"])
    except FileNotFoundError:
        raise _damaged(folder, f"{path.name} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(folder, f"{path.name} is not a valid index: {type(exc).__name__}") from None
    if sum(n for _, n in shards) != total:
        raise _damaged(folder, f"{path.name} lists shards of {sum(n for _, n in shards)} tokens, not {total}")
    for name, n in shards:
        if Path(name).name != name:
            raise _damaged(folder, f"{path.name} names a shard outside the folder: {name!r}")
        try:
            size = (folder / name).stat().st_size
        except FileNotFoundError:
            raise _damaged(folder, f"shard {name} is missing") from None
        if size != n * dtype.itemsize:
            raise _damaged(folder, f"shard {name} holds {size} bytes, its index says {n} {dtype.name} tokens")
    return index


def verify_checksums(folder: Path, split: str) -> None:
    """Recompute every shard's sha256 and compare it with the index (reads the whole split)."""
    for shard in read_index(folder, split)["shards"]:
        h = hashlib.sha256()
        with (Path(folder) / shard["file"]).open("rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        if h.hexdigest() != shard["sha256"]:
            raise _damaged(Path(folder), f"shard {shard['file']} does not match its checksum")


class TokenShards:
    """One split's token stream, read from its shards on demand: ``len(s)`` tokens; ``s[a:b]`` is an array of
    tokens ``a`` to ``b`` (across shard boundaries as needed). Files are opened lazily and reopened after pickling,
    so DataLoader workers receive the folder, not the data."""

    def __init__(self, folder: Path, split: str) -> None:
        self.folder, self.split = Path(folder), split
        index = read_index(self.folder, split)
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.num_documents = int(index["num_documents"])
        self.files = [s["file"] for s in index["shards"]]
        self.ends = np.cumsum([int(s["tokens"]) for s in index["shards"]], dtype=np.int64)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = self._fds[shard] = os.open(self.folder / self.files[shard], os.O_RDONLY)
            except FileNotFoundError:
                raise _damaged(self.folder, f"shard {self.files[shard]} is missing") from None
        return fd

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenShards takes contiguous slices")
        start, stop, _ = key.indices(len(self))
        out = np.empty(max(0, stop - start), dtype=self.dtype)
        pos = start
        shard = int(np.searchsorted(self.ends, start, side="right"))
        size = self.dtype.itemsize
        while pos < stop:
            first = int(self.ends[shard - 1]) if shard else 0
            n = min(stop, int(self.ends[shard])) - pos
            data = os.pread(self._fd(shard), n * size, (pos - first) * size)
            if len(data) != n * size:
                raise _damaged(self.folder, f"shard {self.files[shard]} is shorter than its index says")
            out[pos - start : pos - start + n] = np.frombuffer(data, dtype=self.dtype)
            pos += n
            shard += 1
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}}


def read_counts(folder: Path, split: str) -> np.ndarray:
    """The saved token counts of ``split`` ([vocab] int64)."""
    try:
        return np.load(counts_file(folder, split), allow_pickle=False)
    except (OSError, ValueError):
        raise _damaged(Path(folder), f"{counts_file(folder, split).name} is missing or unreadable") from None
