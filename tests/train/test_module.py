"""LMModule pieces that need no trainer: parameter groups, the learning-rate schedule, T_step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlplatform.recipe import load_recipe, recipe_to_dict
from nlplatform.train.module import LMModule, tokens_per_step, warmup_cosine
from tests.train.conftest import FAST, TINY_RECIPE


def module(*overrides: str) -> LMModule:
    cfg = load_recipe(TINY_RECIPE, [*FAST, "model.vocab_size=257", *overrides])
    return LMModule(recipe_to_dict(cfg))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_weight_decay_only_on_linear_matrices(tied):
    """AdamW decays linear weights; norms, biases and embeddings (tied or not) get no decay; nothing is missed."""
    m = module(f"model.tie_embeddings={str(tied).lower()}", "optim.weight_decay=0.1")
    optimizer = m.configure_optimizers()["optimizer"]
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    embeddings = {id(p) for mod in m.model.modules() if isinstance(mod, nn.Embedding) for p in mod.parameters()}
    norms = {id(p) for n, p in m.model.named_parameters() if p.ndim < 2}
    assert embeddings | norms <= no_decay and not (decay & no_decay)
    assert decay | no_decay == {id(p) for p in m.model.parameters()}
    assert all(g["level"] == "weights" for g in optimizer.param_groups)


def test_warmup_then_cosine_to_the_floor():
    """The multiplier rises linearly over the warm-up, is 1 at its end, and decays by cosine to min_lr_ratio."""
    f = [warmup_cosine(s, warmup=10, total=110, min_ratio=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:110], f[11:111]))
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)


def test_tokens_per_step_counts_sequence_batch_world_and_accumulation():
    """T_step = seq_len x batch x world size x accumulation."""
    cfg = load_recipe(TINY_RECIPE, ["data.seq_len=128", "data.batch_size=6", "trainer.accumulate_grad_batches=3"])
    assert tokens_per_step(cfg, world_size=4) == 128 * 6 * 3 * 4


def test_checkpoint_write_that_fails_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    """AtomicCheckpointIO writes beside the target and renames: a crash mid-write keeps the old checkpoint whole."""
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from nlplatform.train.callbacks import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(self, checkpoint, target, storage_options=None):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# Every family and variant, shrunk: (recipe, extra overrides).
FAMILIES = [
    ("transformer", []),
    ("deltanet", []),
    ("gated_deltanet", []),
    ("titans", []),
    ("titans", ["model.variant=mac"]),
    ("hope", []),
    ("hope", ["model.variant=attention"]),
]
SMALL = ["model.vocab_size=257", "model.d_model=64", "model.n_layers=2"]


def _family_module(family: str, extra: list[str], *overrides: str) -> LMModule:
    recipe = Path(__file__).resolve().parents[2] / "recipes" / family / "tiny.yaml"
    torch.manual_seed(0)
    return LMModule(recipe_to_dict(load_recipe(recipe, [*SMALL, *extra, *overrides])))


def _logits_and_grads(mod: LMModule, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = mod(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    names = {id(p): n for n, p in mod.model.named_parameters()}
    return logits.detach(), {names[id(p)]: p.grad for lv in mod.model.levels() for p in lv.params}


@pytest.mark.parametrize(("family", "extra"), FAMILIES, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_activation_checkpointing_changes_neither_logits_nor_gradients_nor_checkpoint_keys(family, extra):
    """trainer.activation_checkpointing=true recomputes every block in backward: same logits and gradients of
    every level's parameters (HOPE's inner gradients included), and the same state-dict keys."""
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(1))
    plain = _family_module(family, extra)
    ckpt = _family_module(family, extra, "trainer.activation_checkpointing=true")
    assert type(ckpt.model.layers[0]).__name__ == "CheckpointWrapper"
    assert ckpt.model.state_dict().keys() == plain.model.state_dict().keys()
    (la, ga), (lb, gb) = _logits_and_grads(plain, ids), _logits_and_grads(ckpt, ids)
    torch.testing.assert_close(lb, la)
    assert len(ga) == len(gb)
    for (na, a), b in zip(ga.items(), gb.values()):
        assert (a is None) == (b is None), na
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=lambda m, n=na: f"{n}: {m}")


@pytest.mark.parametrize(("family", "extra"), FAMILIES, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_in_context_state_never_crosses_sequences_of_a_batch(family, extra):
    """Each sequence's logits are the same alone as inside a batch: fast state (HOPE's
    self-modifying memories and in-context CMS, Titans' memory, the delta-rule state) is per sequence, so any split
    of a global batch over ranks trains the same model."""
    ids = torch.randint(0, 257, (3, 40), generator=torch.Generator().manual_seed(2))
    mod = _family_module(family, extra)
    batch = mod(ids).detach()
    for i in range(3):
        torch.testing.assert_close(mod(ids[i : i + 1]).detach()[0], batch[i], atol=1e-5, rtol=1e-4)
