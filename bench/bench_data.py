"""Data preparation and reading at scale: tokens/s and peak memory of ``nlplatform data`` on synthetic corpora.

    python bench/bench_data.py            # corpora of 100 and 400 MB (a few minutes on 2 cores)
    python bench/bench_data.py --quick    # 10 and 40 MB

A deterministic synthetic corpus (Zipf-distributed words from a seeded vocabulary, documents of 1 to 64 KB, as parquet
shards of about 32 MB: the form large web corpora come in) is written once per size under ``--workdir``. Each case
prepares it from scratch in its own process (``data.num_proc`` 1 and 2, the byte tokenizer and a byte-level BPE of
8,192 ids trained once beforehand, ``data.tokenizer=file:...``, so the cases time tokenisation, not training), while
this process samples the resident memory of the whole process tree (the preparation and its workers) every 20 ms.
Then the training loader of the largest cache is read (windows of 256 tokens, batch 16, shuffled over the whole
stream) and compared with a tiny Transformer++ training step measured in the same run. Results:
``bench/results/data-<device>.{json,md}``, with the projected time to prepare 30B tokens on a 64-core node.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from common import RESULTS, write_results

ROOT = Path(__file__).resolve().parent.parent
DOC_BYTES = (1 << 10, 1 << 16)  # documents of 1 to 64 KB
SHARD_BYTES = 32 << 20
BPE_VOCAB = 8192

PREPARE = """
import json, sys, time
from pathlib import Path
from nlplatform.config import DataConfig
from nlplatform.data.datamodule import TextDataModule

if __name__ == "__main__":
    corpus, root, tokenizer, num_proc = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    start = time.perf_counter()
    dm = TextDataModule(DataConfig(paths=[corpus], tokenizer=tokenizer, num_proc=num_proc), seed=0, root=root)
    dm.prepare_data()
    seconds = time.perf_counter() - start
    dm.setup()
    print(json.dumps({"seconds": seconds, "tokens": sum(dm.num_tokens.values()), "folder": str(dm.data_dir())}))
"""


CONVERT = """
import sys
from pathlib import Path
from nlplatform.config import DataConfig
from nlplatform.data.corpus import open_corpus

if __name__ == "__main__":
    open_corpus(DataConfig(paths=[sys.argv[1]]), Path(sys.argv[2]))
"""


def write_corpus(folder: Path, megabytes: int) -> Path:
    """``megabytes`` MB of synthetic text as parquet shards in ``folder`` (reused when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "complete"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    words = np.random.default_rng(0)  # one vocabulary for every size, so one BPE fits them all
    vocab = np.array(
        ["".join(chr(97 + c) for c in words.integers(0, 26, words.integers(1, 11))) for _ in range(50_000)]
    )
    rng = np.random.default_rng(megabytes)
    weights = 1.0 / np.arange(1, len(vocab) + 1)  # Zipf: a few words are most of the text, as in real corpora
    weights /= weights.sum()
    total, shard, rows, size = 0, 0, [], 0
    while total < megabytes << 20:
        target = int(rng.integers(*DOC_BYTES))
        words = rng.choice(vocab, size=target // 6 + 1, p=weights)
        doc = " ".join(words)[:target]
        rows.append(doc)
        size += len(doc)
        total += len(doc)
        if size >= SHARD_BYTES or total >= megabytes << 20:
            pq.write_table(pa.table({"text": rows}), folder / f"part-{shard:04d}.parquet")
            shard, rows, size = shard + 1, [], 0
    done.write_text(f"{total}\n")
    return folder


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_sampled(cmd: list[str], env: dict) -> tuple[str, int]:
    """Run ``cmd``; return (stdout, the peak resident memory of its process tree, sampled every 20 ms)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    watched = psutil.Process(proc.pid)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], tree_rss(watched))
            except psutil.Error:
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{err[-3000:]}")
    return out, peak[0]


def train_bpe(corpus: Path, work: Path) -> str:
    """One byte-level BPE trained on (a bounded sample of) ``corpus``, saved as a file the cases load."""
    path = work / f"bpe-{BPE_VOCAB}-{corpus.name}" / "tokenizer.json"
    # trained afresh each run (its time is reported)
    from nlplatform.config import DataConfig
    from nlplatform.data.corpus import open_corpus
    from nlplatform.data.tokenizer import bpe_sample
    from nlplatform.data.tokenizer import train_bpe as train

    docs = bpe_sample(open_corpus(DataConfig(paths=[str(corpus)]), work / "cache").documents(), 32 << 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(train(docs, BPE_VOCAB).to_str())
    return f"file:{path}"


def loader_rate(folder: Path, batches: int) -> dict:
    """Windows/s of the training loader over the cache in ``folder`` and the tiny Transformer++ step it feeds."""
    import torch
    import torch.nn.functional as F

    from nlplatform import registry
    from nlplatform.config import DataConfig
    from nlplatform.data.datamodule import TextDataModule

    torch.set_num_threads(2)
    meta = json.loads((folder / "meta.json").read_text())
    cfg = DataConfig(paths=meta["config"]["paths"], tokenizer="bytes", seq_len=256, batch_size=16)
    dm = TextDataModule(cfg, seed=0, root=folder.parent.parent)
    dm.setup()
    assert dm.data_dir() == folder, (dm.data_dir(), folder)
    loader = iter(dm.train_dataloader())
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        x, y = next(loader)
    read = time.perf_counter() - start
    rss_after_reading = psutil.Process().memory_info().rss / 2**30  # before any model exists
    model = registry.build_model(registry.model_config("transformer", "tiny", vocab_size=257))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    step = float(np.median(times[1:]))
    return {
        "loader_windows_per_s": batches * 16 / read,
        "train_windows_per_s": 16 / step,
        "windows_in_stream": len(dm.windows("train")),
        "rss_gib": rss_after_reading,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="corpora of 10 and 40 MB instead of 100 and 400")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-data", help="corpora and caches")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = (10, 40) if args.quick else (100, 400)
    work = args.workdir.resolve()
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    corpora = {mb: write_corpus(work / f"corpus-{mb}mb", mb) for mb in sizes}
    shutil.rmtree(work / "cache", ignore_errors=True)  # the arrow conversion below is timed from scratch
    converted = {}
    for mb in sizes:  # datasets' one-time conversion of the parquet files into its arrow cache
        cmd = [sys.executable, "-c", CONVERT, str(corpora[mb]), str(work / "cache")]
        start = time.perf_counter()
        _, peak = run_sampled(cmd, env)
        converted[mb] = {"seconds": time.perf_counter() - start, "peak_rss_gib": peak / 2**30}
    start = time.perf_counter()
    bpe = train_bpe(corpora[sizes[0]], work)
    bpe_seconds = time.perf_counter() - start
    rows = []
    for mb in sizes:
        for name, spec in (("bytes", "bytes"), (f"bpe-{BPE_VOCAB}", bpe)):
            for num_proc in (1, 2):
                root = work / f"cache-{mb}-{name}-{num_proc}"
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
                # the parquet -> arrow conversion of `datasets` happens once per corpus (timed apart, below)
                (root / "hf").symlink_to(work / "cache" / "hf", target_is_directory=True)
                cmd = [sys.executable, "-c", PREPARE, str(corpora[mb]), str(root), spec, str(num_proc)]
                out, peak = run_sampled(cmd, env)
                result = json.loads(out.strip().splitlines()[-1])
                row = {
                    "corpus_mb": mb,
                    "tokenizer": name,
                    "num_proc": num_proc,
                    "seconds": result["seconds"],
                    "tokens": result["tokens"],
                    "tokens_per_s": result["tokens"] / result["seconds"],
                    "peak_rss_gib": peak / 2**30,
                    "folder": result["folder"],
                }
                rows.append(row)
                print(
                    f"{mb} MB {name} num_proc={num_proc}: {row['tokens_per_s']:,.0f} tokens/s, "
                    f"{row['peak_rss_gib']:.2f} GiB",
                    flush=True,
                )
    largest = next(r for r in rows if r["corpus_mb"] == sizes[-1] and r["tokenizer"] == "bytes")
    reading = loader_rate(Path(largest["folder"]), 200)

    def rate(mb: int, tok: str, n: int) -> dict:
        return next(r for r in rows if (r["corpus_mb"], r["tokenizer"], r["num_proc"]) == (mb, tok, n))

    table = [
        "| corpus | tokenizer | processes | tokens | seconds | tokens/s | peak RSS of the process tree (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['corpus_mb']} MB | {r['tokenizer']} | {r['num_proc']} | {r['tokens']:,} | "
            f"{r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_rss_gib']:.2f} |"
        )
    bpe_name = f"bpe-{BPE_VOCAB}"
    notes = []
    for tok in ("bytes", bpe_name):
        memory = rate(sizes[-1], tok, 2)["peak_rss_gib"] / rate(sizes[0], tok, 2)["peak_rss_gib"]
        speedup = rate(sizes[-1], tok, 2)["tokens_per_s"] / rate(sizes[-1], tok, 1)["tokens_per_s"]
        notes.append(
            f"{tok}: peak RSS {sizes[-1]} MB / {sizes[0]} MB = {memory:.2f}x (2 processes); "
            f"2 processes / 1 = {speedup:.2f}x tokens/s on the {sizes[-1]} MB corpus"
        )
    per_worker = rate(sizes[-1], bpe_name, 2)["tokens_per_s"] / 2
    hours = 30e9 / (per_worker * 64) / 3600
    notes.append(f"BPE trained once beforehand on at most 32 MB of the {sizes[0]} MB corpus: {bpe_seconds:.1f} s.")
    notes.append(
        "Not in the table: `datasets`' one-time conversion of each corpus's parquet files into its arrow cache (a "
        "second preparation of the same files, e.g. with another tokenizer, reuses it): "
        + ", ".join(f"{mb} MB {c['seconds']:.1f} s, peak {c['peak_rss_gib']:.2f} GiB" for mb, c in converted.items())
        + " (the process, its imports included)."
    )
    notes.append(
        f"Training loader (windows of 256, batch 16, the whole shuffled stream of {reading['windows_in_stream']:,} "
        f"windows, num_workers 0): {reading['loader_windows_per_s']:,.0f} windows/s against "
        f"{reading['train_windows_per_s']:,.1f} windows/s consumed by a tiny Transformer++ training step measured in "
        f"the same run ({reading['loader_windows_per_s'] / reading['train_windows_per_s']:,.0f}x); resident memory "
        f"after reading, before the model was built: {reading['rss_gib']:.2f} GiB (the process, torch included)."
    )
    notes.append(
        f"Projection: 30B BPE tokens on a 64-core node at this machine's {per_worker:,.0f} tokens/s per worker (the "
        f"2-process rate halved), assuming 64 workers scale linearly and the disk keeps up: {hours:.1f} h."
    )
    meta = {
        "sizes_mb": list(sizes),
        "bpe_vocab": BPE_VOCAB,
        "bpe_training_s": bpe_seconds,
        "conversion": converted,
        **reading,
    }
    write_results("data", f"cpu-{psutil.cpu_count()}cores", meta, rows, table, "\n\n".join(notes), folder=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
