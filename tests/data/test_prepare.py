"""Preparation at scale: memory that does not grow with the corpus, and one preparation of a cache at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nlplatform.config import DataConfig
from nlplatform.data.datamodule import TextDataModule

# Prepares data.paths=[argv[1]] under root argv[2] after a warm-up preparation (imports, the worker pool, the
# allocator), then prints the peak resident memory above the resident memory before it (Linux: VmHWM reset through
# /proc/self/clear_refs).
MEASURE = """
import json, sys
from pathlib import Path
from nlplatform.config import DataConfig
from nlplatform.data.datamodule import TextDataModule

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

def prepare(folder, root):
    cfg = DataConfig(paths=[folder], num_proc=2, tokenizer=sys.argv[4])
    TextDataModule(cfg, seed=0, root=Path(root)).prepare_data()

prepare(sys.argv[3], sys.argv[2] + "-warmup")
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
prepare(sys.argv[1], sys.argv[2])
print(json.dumps({"increase_mb": status("VmHWM") - before}))
"""


def write_corpus(folder: Path, megabytes: int) -> str:
    """``megabytes`` MB of random words as 64 KB text files (one document each)."""
    rng = np.random.default_rng(megabytes)
    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(5000)]
    folder.mkdir(parents=True)
    for i in range(megabytes * 16):
        (folder / f"d{i:05d}.txt").write_text(" ".join(rng.choice(words, 11000))[:65536], encoding="utf-8")
    return str(folder)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_preparing_a_corpus_four_times_larger_takes_no_more_memory(tmp_path):
    """The resident memory a preparation adds (the stream, 2 BPE-tokenising workers fed from it, the shard writers)
    is the same for a 16 MB corpus as for a 4 MB one, within 1.2x: nothing holds the corpus or grows with it."""
    from nlplatform.data.tokenizer import build_tokenizer

    warmup = write_corpus(tmp_path / "warmup", 1)
    sample = [p.read_text(encoding="utf-8") for p in sorted(Path(warmup).iterdir())]
    tokenizer = f"file:{build_tokenizer('bpe', sample, tmp_path / 'tok', 1000).save(tmp_path / 'tok')[5:]}"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    increases = {}
    for mb in (4, 16):
        corpus = write_corpus(tmp_path / f"c{mb}", mb)
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, corpus, str(tmp_path / f"root{mb}"), warmup, tokenizer],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        increases[mb] = json.loads(out.stdout.strip().splitlines()[-1])["increase_mb"]
    assert increases[16] <= 1.2 * increases[4] + 1.0, increases  # + 1 MB: the resolution of a few pages


@pytest.mark.slow
def test_two_preparations_of_one_cache_started_together_do_the_work_once(tmp_path, txt_corpus):
    """A second preparation of a cache another process is building waits for it and finds it done: one tokenizer
    training, one tokenisation, one valid cache. The first is held inside its preparation (lock taken, folder staged)
    until the second has said it waits, so the two always overlap."""
    folder = txt_corpus(40, words=300)
    root, go = tmp_path / "shared-cache", tmp_path / "go"
    code = (
        "import sys, time; from pathlib import Path; from nlplatform.config import DataConfig; "
        "from nlplatform.data import prepare; from nlplatform.data.datamodule import TextDataModule\n"
        "if sys.argv[1] == 'first':\n"
        "    real = prepare.prepare_folder\n"
        "    def held(*args, **kwargs):\n"
        f"        while not Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        "        return real(*args, **kwargs)\n"
        "    prepare.prepare_folder = held\n"
        f"TextDataModule(DataConfig(paths=[{str(folder)!r}], tokenizer='bpe', bpe_vocab_size=500), seed=0, "
        f"root=Path({str(root)!r})).prepare_data()"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]

    def start(which: str, log: Path) -> subprocess.Popen:
        with log.open("w") as f:
            return subprocess.Popen([sys.executable, "-c", code, which], stderr=f, text=True, env=env)

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    first = start("first", logs[0])
    tokens = root / "tokens"
    wait_for(lambda: tokens.is_dir() and any("-partial-" in p.name for p in tokens.iterdir()), "the first to stage")
    second = start("second", logs[1])
    wait_for(lambda: "another process is preparing this data" in logs[1].read_text(), "the second to wait")
    go.touch()
    assert [p.wait(timeout=120) for p in (first, second)] == [0, 0], [log.read_text() for log in logs]
    first_log, second_log = (log.read_text() for log in logs)
    assert "training a byte-level BPE" in first_log and "tokenizing" in first_log
    assert "training a byte-level BPE" not in second_log and "tokenizing" not in second_log
    dm = TextDataModule(DataConfig(paths=[str(folder)], tokenizer="bpe", bpe_vocab_size=500), seed=0, root=root)
    dm.setup()
    assert [p.name for p in tokens.iterdir() if not p.name.startswith(".")] == [dm.data_dir().name]
    assert dm.num_documents == {"train": 36, "val": 2, "test": 2}


def test_nlplatform_data_verify_checks_every_shard_and_a_changed_byte_is_one_line_and_exit_2(txt_corpus, capsys):
    """``nlplatform data RECIPE --verify`` recomputes every shard's sha256; after one byte of a shard changes it
    says which shard, in one line, with exit status 2."""
    from nlplatform.cli import main

    args = ["data", "recipes/transformer/tiny.yaml", f"data.paths=[{txt_corpus(12)}]", "data.seq_len=32", "--verify"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "every shard matches its sha256" in out
    folder = Path(out.split("corpus ready in ")[1].split(" (")[0])
    shard = folder / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 1
    shard.write_bytes(bytes(data))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard train-00000.bin does not match its checksum" in err[0], err
