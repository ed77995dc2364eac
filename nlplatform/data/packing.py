"""Training windows over a packed token stream and the resumable, infinite sampler that orders them.

Standard LM packing (``nlplatform.data.prepare`` writes it, ``nlplatform.data.shards`` stores it): every document is
followed by the end-of-text id and all documents are concatenated, so a window may hold the end of one document and
the start of the next, separated by end-of-text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from nlplatform.data.shards import TokenShards


class TokenWindows(Dataset):
    """Non-overlapping training windows: item ``i`` is ``tokens[i*L : i*L + L + 1]`` split into inputs and targets.

    Returns ``(input_ids, targets)``, two int64 tensors of length ``L = seq_len`` with ``targets[j] ==
    input_ids[j + 1]``; consecutive windows share one boundary token (the last target of window ``i`` is the first
    input of window ``i + 1``), so every token is predicted exactly once. ``tokens``: an array or a split's
    ``TokenShards`` (read on demand, and pickled to DataLoader workers as its folder, not its data).
    """

    def __init__(self, tokens: np.ndarray | TokenShards, seq_len: int) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.seq_len = int(seq_len)
        self.tokens = tokens
        self.num_tokens = len(tokens)

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        start = index * self.seq_len
        window = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return window[:-1], window[1:]


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
