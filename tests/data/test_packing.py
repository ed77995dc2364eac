"""Training windows and the resumable sampler."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch

from nlplatform.data.packing import ResumableSampler, TokenWindows


def take(sampler: ResumableSampler, n: int) -> list[int]:
    return list(itertools.islice(iter(sampler), n))


def test_windows_line_up_inputs_and_targets(tmp_path):
    """Window i covers tokens[i*L : i*L+L+1]; targets are the inputs shifted by one; windows do not overlap."""
    tokens = np.arange(103, dtype=np.uint16)
    windows = TokenWindows(tokens, seq_len=10)
    assert len(windows) == 10  # (103 - 1) // 10
    for i in range(len(windows)):
        x, y = windows[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (10,)
        assert x.tolist() == list(range(i * 10, i * 10 + 10))
        assert torch.equal(x[1:], y[:-1]) and y[-1].item() == i * 10 + 10
    with pytest.raises(IndexError):
        windows[10]


def test_sampler_is_deterministic_and_ignores_global_rng():
    """Two samplers with the same seed give the same stream, whatever the global torch RNG does in between."""
    torch.manual_seed(0)
    a = take(ResumableSampler(17, seed=3), 60)
    torch.manual_seed(123)
    torch.rand(5)
    assert take(ResumableSampler(17, seed=3), 60) == a
    assert take(ResumableSampler(17, seed=4), 60) != a


def test_sampler_epochs_are_permutations_that_differ():
    """Each block of N positions is a permutation of all N windows, and consecutive epochs are shuffled differently."""
    stream = take(ResumableSampler(17, seed=0), 51)
    epochs = [stream[i : i + 17] for i in range(0, 51, 17)]
    assert all(sorted(e) == list(range(17)) for e in epochs)
    assert epochs[0] != epochs[1]


def test_sampler_started_at_k_yields_the_tail_of_the_stream():
    """A sampler started at k (resume) yields exactly positions k, k+1, ... of a sampler started at 0."""
    full = take(ResumableSampler(11, seed=5), 80)
    for k in (0, 1, 10, 11, 37):
        assert take(ResumableSampler(11, seed=5, start=k), 80 - k) == full[k:]


def test_ranks_take_disjoint_interleaved_positions_of_one_stream():
    """Rank r of W takes global positions r, r+W, ...: ranks are disjoint and together rebuild the stream."""
    full = take(ResumableSampler(13, seed=2), 60)
    ranks = [take(ResumableSampler(13, seed=2, rank=r, world_size=3), 20) for r in range(3)]
    assert [x for step in zip(*ranks) for x in step] == full
    resumed = take(ResumableSampler(13, seed=2, rank=1, world_size=3, start=12), 16)
    assert resumed == ranks[1][4:]


def test_start_counts_global_positions_so_any_world_size_resumes_the_same_stream():
    """start = positions consumed by all ranks: 3 ranks resumed at 12 continue a 1- or 2-rank stream at 12."""
    full = take(ResumableSampler(13, seed=2), 60)
    for world in (1, 2, 3):
        ranks = [
            take(ResumableSampler(13, seed=2, rank=r, world_size=world, start=12), 48 // world) for r in range(world)
        ]
        assert [x for step in zip(*ranks) for x in step] == full[12:60]


@pytest.mark.parametrize("n", [1, 2, 3, 15, 16, 17, 255, 256, 257, 1000, 4097])
def test_shuffled_index_is_a_bijection_of_every_size(n):
    from nlplatform.data.packing import ShuffledIndex

    for key in (0, 1, 2**40 + 3):
        order = ShuffledIndex(n, key)
        assert sorted(order[i] for i in range(n)) == list(range(n))
    if n > 3:
        assert [ShuffledIndex(n, 1)[i] for i in range(n)] != [ShuffledIndex(n, 2)[i] for i in range(n)]


def test_shuffled_index_spreads_a_position_evenly_over_the_windows():
    """Over 4,000 keys, position 0 of a 10-window shuffle lands on each window about 400 times (a loose 5-sigma
    bound: a biased round function would pile them up)."""
    from nlplatform.data.packing import ShuffledIndex

    counts = [0] * 10
    for key in range(4000):
        counts[ShuffledIndex(10, key)[0]] += 1
    assert all(abs(c - 400) < 5 * 19 for c in counts), counts


def test_the_sampler_holds_no_list_of_windows_however_large_the_corpus():
    """A stream over 10^12 windows (30B tokens x 30 epochs would be far less) starts at once and its state stays a
    few numbers: no permutation of every window is materialised, on any rank, at any resume position."""

    sampler = ResumableSampler(10**12, seed=1, rank=3, world_size=8, start=10**11 + 5)
    stream = iter(sampler)
    first = [next(stream) for _ in range(5)]
    assert len(set(first)) == 5 and all(0 <= x < 10**12 for x in first)
    assert len(pickle.dumps(sampler)) < 512
