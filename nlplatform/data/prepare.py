"""Preparation: a corpus stream -> document split -> tokenizer -> token shards, tokenised by worker processes.

The corpus is read as a stream (``corpus.open_corpus``): each document is assigned to its split as it passes
(``corpus.SplitRule``), tokenised, followed by end-of-text and appended to its split's shards
(``shards.ShardWriter``). Nothing holds the corpus: memory is a few batches of text in flight per worker, the split's
two thresholds, the BPE sample (``data.tokenizer_sample_bytes``) and the token counts.

Tokenisation runs in ``data.num_proc`` worker processes (spawned, one thread each: they import numpy and the
tokenizer, not torch), fed batches of about 256 KB of text in corpus order and drained in that order, with at most two
batches per worker in flight; the tokens do not depend on the number of workers. The first 2 MB are tokenised in this
process, so a small corpus never pays for starting workers, and the byte tokenizer (a copy of the UTF-8 bytes) never
starts any. Workers are spawned, so a script that prepares data must guard its entry point with
``if __name__ == "__main__":`` (as for any spawned DataLoader worker); the ``nlplatform`` commands do.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nlplatform.data.shards import SHARD_TOKENS, ShardWriter, token_dtype
from nlplatform.data.tokenizer import Tokenizer

if TYPE_CHECKING:  # the workers import this module: they need neither the corpus readers nor the config
    from nlplatform.data.corpus import Corpus, SplitRule

SPLITS = ("train", "val", "test")
_BATCH_CHARS = 1 << 18  # text per tokenisation task: small, so little is in flight
_INLINE_CHARS = 2 << 20  # tokenised in this process before any worker starts (tiny corpora start none)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each text's tokens followed by end-of-text, concatenated, and each document's end offset in the result."""
    arrays = tokenizer.encode_arrays(texts)
    ends = np.cumsum([len(a) + 1 for a in arrays], dtype=np.int64)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=token_dtype(tokenizer.vocab_size))
    start = 0
    for ids, end in zip(arrays, ends):
        out[start : end - 1] = ids
        out[end - 1] = tokenizer.eot_id
        start = int(end)
    return out, ends


# ------------------------------------------------------------------------------------------- worker processes

_worker_tokenizer: Tokenizer | None = None


def _portable(tokenizer: Tokenizer) -> tuple[str | None, str, int]:
    return (None if tokenizer.backend is None else tokenizer.backend.to_str(), tokenizer.name, tokenizer.eot_id)


def _init_worker(json_text: str | None, name: str, eot_id: int) -> None:
    # one thread per worker: the processes are the parallelism (set before tokenizers starts its thread pool)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    global _worker_tokenizer
    if json_text is None:
        _worker_tokenizer = Tokenizer()
    else:
        from tokenizers import Tokenizer as HFTokenizer

        _worker_tokenizer = Tokenizer(HFTokenizer.from_str(json_text), name=name, eot_id=eot_id)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None
    return encode_documents(_worker_tokenizer, texts)


# ------------------------------------------------------------------------------------------- the pipeline


def _tasks(corpus: Corpus, rule: SplitRule) -> Iterator[tuple[list[str], list[str], int]]:
    """(split of each document, the documents, their characters): batches of about ``_BATCH_CHARS`` in corpus
    order."""
    labels: list[str] = []
    texts: list[str] = []
    chars = index = 0
    for batch in corpus.batches():
        for text in batch:
            labels.append(rule(index))
            texts.append(text)
            chars += len(text)
            index += 1
            if chars >= _BATCH_CHARS:
                yield labels, texts, chars
                labels, texts, chars = [], [], 0
    if texts:
        yield labels, texts, chars


def write_splits(
    corpus: Corpus,
    rule: Callable[[int], str],
    tokenizer: Tokenizer,
    folder: Path,
    *,
    num_proc: int,
    max_tokens: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
) -> dict[str, dict[str, Any]]:
    """Tokenise ``corpus`` (``corpus.Corpus``) into the shards of each split in ``folder``, document ``i`` going to
    ``rule(i)``; stop before the first document that starts once ``max_tokens`` tokens are written. Returns each
    split's index."""
    from tqdm.auto import tqdm

    writers = {
        split: ShardWriter(
            folder,
            split,
            vocab_size=tokenizer.vocab_size,
            eot_id=tokenizer.eot_id,
            tokenizer=tokenizer.fingerprint,
            shard_tokens=shard_tokens,
        )
        for split in SPLITS
    }
    pending: deque[tuple[list[str], Future]] = deque()
    pool: ProcessPoolExecutor | None = None
    inline = written = 0
    bar = tqdm(total=corpus.count, desc="tokenizing", unit="doc", disable=corpus.count < 10_000, leave=False)

    def drain() -> bool:
        """Write the oldest task's documents; False once ``max_tokens`` is reached."""
        nonlocal written
        labels, future = pending.popleft()
        tokens, ends = future.result()
        starts = np.concatenate([[0], ends[:-1]])
        n = len(labels)
        if max_tokens is not None:  # documents that start before the cap
            n = int(np.searchsorted(starts, max_tokens - written, side="left"))
        i = 0
        while i < n:  # runs of consecutive documents of one split
            j = i + 1
            while j < n and labels[j] == labels[i]:
                j += 1
            writers[labels[i]].write(tokens[starts[i] : ends[j - 1]], ends[i:j] - starts[i])
            i = j
        written += int(ends[n - 1]) if n else 0
        bar.update(n)
        return n == len(labels)

    try:
        going = True
        for labels, texts, chars in _tasks(corpus, rule):
            # the byte tokenizer is a copy of the UTF-8 bytes: shipping text to workers would cost more than it
            if pool is None and num_proc > 1 and tokenizer.backend is not None and inline >= _INLINE_CHARS:
                pool = ProcessPoolExecutor(
                    num_proc, mp_context=get_context("spawn"), initializer=_init_worker, initargs=_portable(tokenizer)
                )
            future: Future = Future()
            if pool is None:
                future.set_result(encode_documents(tokenizer, texts))
                inline += chars
            else:
                future = pool.submit(_encode_in_worker, texts)
            pending.append((labels, future))
            while going and len(pending) > (2 * num_proc if pool is not None else 0):
                going = drain()
            if not going:
                break
        while going and pending:
            going = drain()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return {split: writer.close() for split, writer in writers.items()}


def prepare_folder(cfg: Any, root: Path, staging: Path, *, shard_tokens: int | None = None) -> dict[str, Any]:
    """Everything a token folder holds, written into ``staging``: the shards of every split and the tokenizer.
    Returns the meta data (``meta.json``'s content, without the cache key)."""
    from nlplatform.data.corpus import SplitRule, open_corpus
    from nlplatform.data.tokenizer import build_tokenizer

    corpus = open_corpus(cfg, root)
    rule = SplitRule(corpus.count, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)

    # the train documents are a lazy stream: read only when a bpe tokenizer is trained
    tokenizer = build_tokenizer(
        cfg.tokenizer, rule.pick(corpus, "train"), root, cfg.bpe_vocab_size, cfg.tokenizer_sample_bytes
    )
    num_proc = cfg.num_proc or available_cores()
    print(
        f"nlplatform: tokenizing {corpus.count:,} documents ({tokenizer.name}, up to {num_proc} processes)",
        file=sys.stderr,
    )
    indexes = write_splits(
        corpus,
        rule,
        tokenizer,
        staging,
        num_proc=num_proc,
        max_tokens=cfg.max_tokens,
        shard_tokens=shard_tokens or SHARD_TOKENS,
    )
    spec = tokenizer.save(staging)
    return {
        # relative to the folder, which is renamed after this is written
        "tokenizer": {"spec": "bytes" if spec == "bytes" else "file:tokenizer.json", "name": tokenizer.name},
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "documents": {split: indexes[split]["num_documents"] for split in SPLITS},
        "tokens": {split: indexes[split]["num_tokens"] for split in SPLITS},
    }
