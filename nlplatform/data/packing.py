"""Packing: documents -> one flat token file; fixed training windows over it; a resumable infinite sampler.

Standard LM packing: every document is followed by the end-of-text id and all documents are concatenated, so a
window may hold the end of one document and the start of the next, separated by end-of-text. Token files are raw
little-endian ``uint16`` (``uint32`` for vocabularies above 65,536) with a JSON sidecar (``train.bin`` ->
``train.json``) recording dtype and length, and are read back as read-only memory maps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from nlplatform.files import atomic_write_text, replace_durably, temporary_tag

if TYPE_CHECKING:
    from nlplatform.data.tokenizer import Tokenizer

_PACK_BATCH = 256  # documents per encode_batch call
_PROGRESS_CHARS = 20_000_000  # show a progress bar above this many characters


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def sidecar(path: Path) -> Path:
    """The JSON file describing token file ``path`` (``train.bin`` -> ``train.json``)."""
    return Path(path).with_suffix(".json")


def counts_file(path: Path) -> Path:
    """The token counts of token file ``path`` (``train.bin`` -> ``train.counts.npy``), saved while packing, so the
    unigram baseline never scans the tokens again."""
    return Path(path).with_suffix(".counts.npy")


def read_counts(path: Path, vocab: int) -> np.ndarray | None:
    """The saved counts of token file ``path`` ([vocab] int64), or None for a cache built before they were saved."""
    try:
        counts = np.load(counts_file(path), allow_pickle=False)
    except (OSError, ValueError):
        return None
    return counts if counts.shape == (vocab,) else None


def pack_tokens(docs: Sequence[str], tokenizer: Tokenizer, path: str | Path) -> np.memmap:
    """Tokenise ``docs``, append ``eot_id`` after each, write one flat array to ``path``; return it memory-mapped.

    The array is streamed to a temporary file and renamed into place, so ``path`` is either absent or complete.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = path.with_name(f".{path.name}.tmp-{temporary_tag()}")
    large = sum(len(d) for d in docs) > _PROGRESS_CHARS
    bar = tqdm(total=len(docs), desc=f"tokenizing {path.stem}", unit="doc", disable=not large, leave=False)
    count = 0
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    counts_tmp = counts_file(path).with_name(f".{counts_file(path).name}.tmp-{temporary_tag()}")
    try:
        with tmp.open("wb") as f:
            for start in range(0, len(docs), _PACK_BATCH):
                batch = docs[start : start + _PACK_BATCH]
                for ids in tokenizer.encode_arrays(batch):
                    packed = np.empty(len(ids) + 1, dtype=dtype)
                    packed[:-1] = ids
                    packed[-1] = tokenizer.eot_id
                    f.write(packed.astype(dtype.newbyteorder("<"), copy=False).tobytes())
                    counts += np.bincount(packed, minlength=tokenizer.vocab_size)[: tokenizer.vocab_size]
                    count += len(packed)
                bar.update(len(batch))
        meta = {
            "dtype": dtype.name,
            "num_tokens": count,
            "num_documents": len(docs),
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "tokenizer": tokenizer.fingerprint,
        }
        with counts_tmp.open("wb") as f:
            np.save(f, counts)
        replace_durably(counts_tmp, counts_file(path))
        atomic_write_text(sidecar(path), json.dumps(meta, indent=1) + "\n")
        replace_durably(tmp, path)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
        counts_tmp.unlink(missing_ok=True)
    return open_tokens(path)


def open_tokens(path: str | Path) -> np.memmap:
    """The token file ``path`` as a read-only memory map (dtype and length from its sidecar, checked)."""
    path = Path(path)
    meta = json.loads(sidecar(path).read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    count = int(meta["num_tokens"])
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise RuntimeError(
            f"{path} holds {size} bytes, but its sidecar says {count} {dtype.name} tokens; "
            f"the cache is damaged: delete {path.parent} to rebuild it"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class TokenWindows(Dataset):
    """Non-overlapping training windows: item ``i`` is ``tokens[i*L : i*L + L + 1]`` split into inputs and targets.

    Returns ``(input_ids, targets)``, two int64 tensors of length ``L = seq_len`` with ``targets[j] ==
    input_ids[j + 1]``; consecutive windows share one boundary token (the last target of window ``i`` is the first
    input of window ``i + 1``), so every token is predicted exactly once. Given a path, the memory map is reopened
    lazily in each DataLoader worker instead of being pickled.
    """

    def __init__(self, tokens: np.ndarray | str | Path, seq_len: int) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.seq_len = int(seq_len)
        self.path = Path(tokens) if isinstance(tokens, (str, Path)) else None
        self._tokens: np.ndarray | None = open_tokens(self.path) if self.path is not None else tokens
        self.num_tokens = len(self._tokens)

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            assert self.path is not None
            self._tokens = open_tokens(self.path)
        return self._tokens

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        start = index * self.seq_len
        window = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.path is not None:
            state["_tokens"] = None  # workers reopen the file instead of receiving a copy of it
        return state


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"resumable-sampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


_MASK64 = (1 << 64) - 1
_ROUNDS = 6  # Feistel rounds: 4 already make a pseudo-random permutation of a good round function; 6 for margin


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of ``x``."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


class ShuffledIndex:
    """A seeded permutation of ``range(n)`` evaluated one position at a time in O(1) memory: ``self[i]`` is the window
    at position ``i``. A balanced Feistel network permutes the smallest even-bit-width domain 2^(2h) >= n (at most 4n)
    and positions that land outside ``range(n)`` walk the cycle until they fall inside (fewer than 4 steps on
    average): a bijection on ``range(n)`` whatever ``n``, with no list of n indices to hold (a permutation of 30B tokens'
    windows would be gigabytes per rank)."""

    def __init__(self, n: int, key: int) -> None:
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.low = (1 << self.half) - 1
        self.keys = [_mix(key + round_) for round_ in range(_ROUNDS)]

    def _permute(self, x: int) -> int:
        left, right = x >> self.half, x & self.low
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.low)
        return (left << self.half) | right

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self._permute(i)
        while x >= self.n:
            x = self._permute(x)
        return x


class ResumableSampler(Sampler[int]):
    """An infinite, resumable stream of indices into ``num_samples`` windows, sharded over ranks.

    The global stream is epoch after epoch, each a permutation of all windows seeded by ``(seed, epoch)``
    (``ShuffledIndex``: computed position by position, so memory does not grow with the corpus): global position ``p``
    is window ``perm(p // N)[p % N]``. ``start`` is the number of
    global positions already consumed (by all ranks together); rank ``r`` of ``W`` then takes positions
    ``start + r, start + r + W, ...``. A global batch of ``W`` ranks x ``b`` windows is therefore the same set of
    windows as one process's batch of ``W * b``, and a run resumed at ``start`` continues exactly where it stopped
    with any number of ranks. Nothing depends on the global RNG.

    It has no ``__len__`` (the stream never ends): training length is set by ``max_steps``.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start = int(start)

    def permutation(self, epoch: int) -> ShuffledIndex:
        """The order of all windows in global epoch ``epoch``."""
        return ShuffledIndex(self.num_samples, _epoch_seed(self.seed, epoch))

    def __iter__(self) -> Iterator[int]:
        position = self.start + self.rank
        epoch, order = -1, None
        while True:
            current, offset = divmod(position, self.num_samples)
            if current != epoch:
                epoch, order = current, self.permutation(current)
            yield order[offset]
            position += self.world_size
