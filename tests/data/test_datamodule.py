"""TextDataModule end to end on generated corpora: caching, loaders, resume offsets, sharding, baseline."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nlplatform.config import DataConfig
from nlplatform.data import cache_root
from nlplatform.data.datamodule import TextDataModule
from nlplatform.errors import UserError

# The real cache, resolved before the autouse fixture redirects NLPLATFORM_CACHE.
REAL_CACHE = cache_root().resolve()


def make_module(folder, seed: int = 0, **overrides) -> TextDataModule:
    cfg = {"paths": [str(folder)], "seq_len": 32, "batch_size": 4, "val_fraction": 0.2, "test_fraction": 0.2}
    cfg.update(overrides)
    return TextDataModule(DataConfig(**cfg), seed=seed)


def fake_trainer(step: int = 0, accumulate: int = 1, rank: int = 0, world: int = 1, distributed_sampler=False):
    connector = SimpleNamespace(use_distributed_sampler=distributed_sampler)
    return SimpleNamespace(
        global_step=step,
        accumulate_grad_batches=accumulate,
        global_rank=rank,
        world_size=world,
        _accelerator_connector=connector,
    )


@pytest.mark.parametrize(("tokenizer", "vocab"), [("bytes", 257), ("bpe", 300)])
def test_end_to_end_gives_vocab_batches_and_a_unigram_baseline(txt_corpus, tokenizer, vocab):
    """On a generated corpus: the vocab matches the tokenizer, batches are (B, L) pairs, unigram perplexity > 1."""
    dm = make_module(txt_corpus(12), tokenizer=tokenizer, bpe_vocab_size=300)
    dm.prepare_data()
    dm.setup()
    assert dm.vocab_size == vocab and dm.tokenizer is not None
    assert dm.num_documents == {"train": 8, "val": 2, "test": 2}
    assert all(n > 33 for n in dm.num_tokens.values())
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < vocab
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert all(b[0].shape[1] == 32 for b in loader)
    assert 1.0 < dm.unigram_perplexity() < vocab
    assert (cache_root() / "tokens" / dm.fingerprint / "train-00000.bin").is_file()


def test_second_prepare_uses_the_cache(txt_corpus, monkeypatch):
    """Once prepared, prepare_data and a new module's setup neither reload the corpus nor re-tokenise."""
    folder = txt_corpus(8)
    make_module(folder).setup()  # setup prepares when nothing is cached

    def no_loading(*args, **kwargs):
        raise AssertionError("corpus loaded again")

    from nlplatform.data import corpus

    monkeypatch.setattr(corpus, "open_corpus", no_loading)
    again = make_module(folder)
    again.prepare_data()
    again.setup()
    assert again.vocab_size == 257


def test_cache_key_follows_split_seed_and_tokenizer(txt_corpus):
    """Changing the split seed or the tokenizer gives another token folder; the same config the same one."""
    folder = txt_corpus(8)
    key = make_module(folder).data_key()
    assert make_module(folder).data_key() == key
    assert make_module(folder, split_seed=1).data_key() != key
    assert make_module(folder, tokenizer="bpe").data_key() != key


def test_train_loader_resumes_at_the_consumed_samples(txt_corpus):
    """With a trainer at global_step s and accumulation a, the train loader starts at batch s*a of a fresh run."""
    dm = make_module(txt_corpus(12), seed=9)
    dm.setup()
    fresh = list(itertools.islice(iter(dm.train_dataloader()), 8))
    dm.trainer = fake_trainer(step=3, accumulate=2)
    resumed = list(itertools.islice(iter(dm.train_dataloader()), 2))
    assert torch.equal(resumed[0][0], fresh[6][0]) and torch.equal(resumed[1][0], fresh[7][0])


def test_two_ranks_train_on_disjoint_halves_of_the_one_process_global_batch(txt_corpus):
    """Rank 0 and rank 1 of 2 (batch b each) get disjoint windows whose union is one process's batch of 2b."""
    folder = txt_corpus(12)
    single = make_module(folder, seed=9, batch_size=8)
    single.setup()
    one = list(itertools.islice(iter(single.train_dataloader()), 3))
    halves = []
    for rank in range(2):
        dm = make_module(folder, seed=9, batch_size=4)
        dm.setup()
        dm.trainer = fake_trainer(rank=rank, world=2)
        halves.append(list(itertools.islice(iter(dm.train_dataloader()), 3)))

    def rows(batch) -> list[tuple]:
        return [tuple(r.tolist()) for r in batch[0]]

    for step in range(3):
        rank0, rank1 = rows(halves[0][step]), rows(halves[1][step])
        assert not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == sorted(rows(one[step]))


def test_checkpoint_carries_the_consumed_windows_so_a_resume_may_change_the_world_size(txt_corpus):
    """A checkpoint written at step 3 of a 2-rank run resumes on 1 rank (batch 2b) at that run's next global batch."""
    folder = txt_corpus(12)
    single = make_module(folder, seed=9, batch_size=8)
    single.setup()
    uninterrupted = list(itertools.islice(iter(single.train_dataloader()), 5))
    ddp = make_module(folder, seed=9, batch_size=4)
    ddp.setup()
    ddp.trainer = fake_trainer(step=3, rank=0, world=2)
    state = ddp.state_dict()
    assert state["consumed_samples"] == 3 * 4 * 2 and state["at_step"] == 3
    resumed = make_module(folder, seed=9, batch_size=8)
    resumed.setup()
    resumed.load_state_dict(state)
    resumed.trainer = fake_trainer(step=3, rank=0, world=1)
    batches = list(itertools.islice(iter(resumed.train_dataloader()), 2))
    assert torch.equal(batches[0][0], uninterrupted[3][0]) and torch.equal(batches[1][0], uninterrupted[4][0])
    resumed.trainer = fake_trainer(step=5, rank=0, world=1)
    assert resumed.state_dict()["consumed_samples"] == 24 + 2 * 8


def test_eval_loaders_shard_disjoint_equal_blocks_over_ranks(txt_corpus):
    """With two ranks, val windows split into disjoint, equally long blocks; Lightning's own sharding is refused."""
    dm = make_module(txt_corpus(12), val_batches=0)
    dm.setup()
    total = len(dm.windows("val"))
    blocks = [dm.eval_indices("val", rank, 2) for rank in range(2)]
    assert len(blocks[0]) == len(blocks[1]) == total // 2 and not set(blocks[0]) & set(blocks[1])
    dm.trainer = fake_trainer(rank=1, world=2)
    assert sum(len(b[0]) for b in dm.val_dataloader()) == total // 2
    dm.trainer = fake_trainer(rank=0, world=2, distributed_sampler=True)
    with pytest.raises(RuntimeError, match="use_distributed_sampler=False"):
        dm.val_dataloader()


def test_val_batches_limits_evaluation_to_evenly_spread_windows(txt_corpus):
    """val_batches=2 evaluates 2 batches of windows spread over the whole split, in order."""
    dm = make_module(txt_corpus(12), val_batches=2)
    dm.setup()
    chosen = dm.eval_indices("val")
    assert len(chosen) == 8 and chosen == sorted(set(chosen)) and chosen[-1] >= len(dm.windows("val")) // 2
    assert len(list(dm.val_dataloader())) == 2


def test_val_split_shorter_than_a_window_is_a_user_error(txt_corpus):
    """A val split with fewer than seq_len + 1 tokens fails with advice on data.seq_len and data.val_fraction."""
    dm = make_module(txt_corpus(12, words=60), seq_len=1024, val_fraction=0.1, test_fraction=0.1)
    with pytest.raises(UserError, match=r"val split has \d+ tokens.*data\.seq_len.*data\.val_fraction"):
        dm.setup()


def test_checkpoint_state_warns_when_the_data_changed(txt_corpus):
    """state_dict records the data fingerprint; loading a different one warns instead of failing."""
    dm = make_module(txt_corpus(8))
    dm.setup()
    state = dm.state_dict()
    assert state["fingerprint"] == dm.fingerprint and state["vocab_size"] == 257 and state["tokenizer"] == "bytes"
    dm.load_state_dict(state)  # same data: silent
    with pytest.warns(UserWarning, match="changed"):
        dm.load_state_dict({**state, "fingerprint": "0123456789abcdef"})


@pytest.mark.parametrize("shard_tokens", [None, 500])
def test_lightning_kill_and_resume_sees_the_same_batches(txt_corpus, tmp_path, monkeypatch, shard_tokens):
    """A Lightning run stopped after 3 steps and resumed to 6 trains on exactly the batches of an uninterrupted run,
    also when the training stream is cut into shards of 500 tokens (windows and the resume point fall mid-shard and
    across shard boundaries)."""
    import lightning as L

    from nlplatform.data import prepare
    from nlplatform.data.shards import read_index

    if shard_tokens:
        monkeypatch.setattr(prepare, "SHARD_TOKENS", shard_tokens)

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch[0].clone())
            return (self.weight * batch[0].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(max_steps, ckpt=None):
        model = Recorder()
        trainer = L.Trainer(
            max_steps=max_steps,
            accumulate_grad_batches=2,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(model, datamodule=make_module(folder, seed=4), ckpt_path=ckpt)
        return trainer, model.seen

    folder = txt_corpus(12)
    _, straight = fit(6)
    shards = len(read_index(make_module(folder, seed=4).data_dir(), "train")["shards"])
    assert shards == 1 if shard_tokens is None else shards > 10
    trainer, first = fit(3)
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    _, second = fit(6, ckpt=str(tmp_path / "step3.ckpt"))
    assert len(straight) == 12 and len(first) == 6 and len(second) == 6
    assert all(torch.equal(a, b) for a, b in zip(first + second, straight))


def test_the_validation_windows_do_not_depend_on_the_layout_at_equal_tokens_per_step(txt_corpus):
    """batch 4 on 1 device, batch 2 on 2 devices and batch 2 with 2 accumulated micro-batches evaluate the same
    windows (what a resume on another number of devices keeps)."""
    folder = txt_corpus(12)
    layouts = [(4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2)]  # (batch, world, accumulate)
    windows = []
    for batch, world, acc in layouts:
        dm = make_module(folder, val_batches=1, batch_size=batch)
        dm.setup()
        windows.append(sorted(i for r in range(world) for i in dm.eval_indices("val", r, world, acc)))
    assert all(w == windows[0] for w in windows) and len(windows[0]) == 4
    dm.trainer = fake_trainer(accumulate=2)
    assert len(list(dm.val_dataloader())) == 2  # batch 1 x accumulation 2 per validation step's worth


def test_the_unigram_baseline_reads_the_counts_saved_at_preparation_not_the_tokens(txt_corpus, monkeypatch):
    """Preparation saves each split's token counts beside its shards; the baseline reads them and never the tokens
    (what every rank did at the end of a run)."""
    from nlplatform.data.shards import TokenShards, read_counts

    dm = make_module(txt_corpus(12), tokenizer="bpe", bpe_vocab_size=300)
    dm.setup()
    folder = dm.data_dir()
    for split in ("train", "val", "test"):
        shards = TokenShards(folder, split)
        saved = read_counts(folder, split)
        assert saved.dtype == np.int64 and np.array_equal(saved, np.bincount(shards[0 : len(shards)], minlength=300))
    expected = dm.unigram_perplexity()
    monkeypatch.setattr(TokenShards, "__getitem__", lambda *a: pytest.fail("read the tokens"))
    assert dm.unigram_perplexity() == expected


# The token streams of the default corpus as the single-file layout (cache format 1) wrote them: sha256 of each split's
# little-endian uint16 tokens. The sharded, streamed preparation must give them token for token.
FORMAT_1_DIGESTS = {
    "bytes": {
        "train": "76ec804399bfbb10afe451b5807f6133e9e9b77c9862332e0b33600660da7518",
        "val": "79470aa70ea66e0eea68f5f37341e9a9afa237e280d43bf3e3ed63156bcaddae",
        "test": "ae6beadf1999e5589a4ecd507ceb32c1d258d6fa246050f1e05621c74ceed312",
    },
    "bpe": {
        "train": "f9af7c434cb124acfbc3ab3f2f73cff525b9b8ad6e2e411fbf6bc6e56f7e892f",
        "val": "c8d28e342d2b5dc3879a767f128bac4aa734eb07006af81390d24f1f24ede534",
        "test": "ecbc7fdf89843843b551fece2eac7bd9cdfa6d96a582bfb788f2eebbcc61bb93",
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_the_default_corpus_prepares_token_for_token_as_before(tmp_path, tokenizer):
    """Streaming, sharded preparation of the default corpus gives exactly the tokens the whole-corpus preparation gave
    (its recorded digests), so the default split, tokenizer and packing are unchanged; for bytes the stream is also
    rebuilt here literally: the plays ranked by sha256("0:<index>"), 2 to val, 2 to test, each play's UTF-8 bytes
    followed by 256."""
    import hashlib

    from nlplatform.data.corpus import default_corpus_dir, default_corpus_present
    from nlplatform.data.shards import TokenShards

    real = default_corpus_dir(REAL_CACHE)
    if not default_corpus_present(REAL_CACHE):
        pytest.skip("default corpus not fetched; run make data")
    root = tmp_path / "cache"
    (root / "corpora").mkdir(parents=True)
    (root / "corpora" / "shakespeare").symlink_to(real)
    dm = TextDataModule(DataConfig(tokenizer=tokenizer), seed=0, root=root)
    dm.setup()
    streams = {}
    for split in ("train", "val", "test"):
        shards = TokenShards(dm.data_dir(), split)
        streams[split] = shards[0 : len(shards)]
        assert hashlib.sha256(streams[split].astype("<u2").tobytes()).hexdigest() == FORMAT_1_DIGESTS[tokenizer][split]
    if tokenizer == "bytes":
        names = sorted(p.name for p in real.glob("*_gut.txt"))
        order = sorted(range(len(names)), key=lambda i: hashlib.sha256(f"0:{i}".encode()).digest())
        members = {"val": order[:2], "test": order[2:4], "train": order[4:]}
        for split, indices in members.items():
            expected = [b for i in sorted(indices) for b in [*(real / names[i]).read_text().encode(), 256]]
            assert streams[split].tolist() == expected
