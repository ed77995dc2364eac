"""Transformer++: causality, shapes, cached decoding, tying, levels, gradients, config checks and generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlplatform.errors import ConfigError
from nlplatform.generate import generate
from nlplatform.layers import RMSNorm, RotaryEmbedding
from nlplatform.levels import check_levels
from nlplatform.models.transformer import Transformer, TransformerConfig
from nlplatform.registry import build_model, model_config

SMALL = dict(d_model=64, n_layers=2, n_heads=4, vocab_size=97)


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(**{**SMALL, **overrides})).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- forward


@torch.no_grad()
@pytest.mark.parametrize("t", [0, 5, 14])
def test_changing_later_tokens_never_changes_earlier_logits(t):
    """Logits at positions <= t are unchanged when the tokens after t change (and those after t do change)."""
    model = make()
    ids = tokens(2, 16)
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % SMALL["vocab_size"]
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


@torch.no_grad()
@pytest.mark.parametrize("length", [1, 7, 33])
def test_forward_returns_batch_time_vocab_logits_for_any_length(length):
    """forward maps [B, T] ids to finite [B, T, vocab] logits for T = 1 and odd T."""
    logits = make()(tokens(3, length))
    assert logits.shape == (3, length, SMALL["vocab_size"])
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------- decoding


@torch.no_grad()
@pytest.mark.parametrize(
    ("n_kv_heads", "chunks"),
    [
        (None, [1] * 12),
        (2, [1] * 12),
        (1, [1] * 12),
        (None, [5] + [1] * 7),
        (2, [5] + [1] * 7),
        (2, [4, 3, 1, 2, 1, 1]),
    ],
    ids=["mha-single", "gqa2-single", "mqa-single", "mha-prefill", "gqa2-prefill", "gqa2-chunks"],
)
def test_cached_step_decoding_equals_full_forward(n_kv_heads, chunks):
    """Feeding the sequence through step() in chunks (prefill, then single tokens) gives the full forward's logits."""
    model = make(n_kv_heads=n_kv_heads)
    ids = tokens(2, sum(chunks))
    full = model(ids)
    state = model.init_state(2, ids.shape[1], device="cpu", dtype=torch.float32)
    outs, start = [], 0
    for size in chunks:
        logits, state = model.step(ids[:, start : start + size], state)
        outs.append(logits)
        start += size
        assert state.length == start
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_step_past_the_state_max_len_raises():
    """step() refuses tokens beyond the max_len the state was made for."""
    model = make()
    state = model.init_state(1, 4, device="cpu", dtype=torch.float32)
    model.step(tokens(1, 3), state)
    with pytest.raises(ValueError, match="max_len"):
        model.step(tokens(1, 2), state)


# ----------------------------------------------------------------------------------------------- parameters


def test_tied_embeddings_share_one_tensor_and_save_vocab_times_d_model_params():
    """With tie_embeddings the LM head is the token embedding, and the model has vocab * d_model fewer params."""
    tied, untied = make(tie_embeddings=True), make()
    assert tied.output_weight is tied.tok_emb.weight
    assert untied.output_weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == SMALL["vocab_size"] * SMALL["d_model"]


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_then_to_empty_and_init_weights_gives_a_working_model(tie):
    """A model built on the meta device, materialised with to_empty and init_weights, keeps its tie and runs."""
    with torch.device("meta"):
        model = Transformer(TransformerConfig(**SMALL, tie_embeddings=tie))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert (model.output_weight is model.tok_emb.weight) == tie
    assert torch.isfinite(model(tokens(1, 5))).all()


@pytest.mark.parametrize("tie", [False, True])
def test_levels_is_one_persistent_weights_level_covering_every_parameter_once(tie):
    """levels() is a single persistent "weights" level, stepped every optimizer step, owning each parameter once."""
    model = make(tie_embeddings=tie)
    levels = model.levels()
    assert len(levels) == 1
    (level,) = levels
    assert (level.name, level.scope, level.chunk_size, level.update) == (
        "weights",
        "persistent",
        None,
        "outer optimizer",
    )
    ids = [id(p) for p in level.params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert level.num_params == model.num_params()
    check_levels(levels, model, seq_len=16)


def test_flops_per_token_is_six_n_plus_attention_term():
    """flops_per_token = 6 * (params without the embedding table) + 12 * n_layers * d_model * seq_len."""
    model = make()
    n = model.num_params() - SMALL["vocab_size"] * SMALL["d_model"]
    assert model.num_params(exclude_embeddings=True) == n
    assert model.flops_per_token(128) == 6 * n + 12 * 2 * 64 * 128


def test_tiny_preset_forward_backward_gives_finite_gradients_for_every_parameter():
    """One forward+backward of the tiny preset gives a finite gradient for every parameter."""
    torch.manual_seed(0)
    model = build_model(model_config("transformer", "tiny", vocab_size=257)).train()
    ids = torch.randint(0, 257, (2, 33))
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        (dict(d_model=0), "d_model"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_heads=-4), "n_heads"),
        (dict(d_model=66), "divisible"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(n_kv_heads=0), "n_kv_heads"),
        (dict(ffn_hidden=0), "ffn_hidden"),
        (dict(d_model=12, n_heads=4), "even"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(init_std=0.0), "init_std"),
    ],
)
def test_impossible_sizes_raise_config_error(bad, key):
    """Sizes that cannot build a model fail at config time with a ConfigError naming the problem."""
    with pytest.raises(ConfigError, match=key):
        TransformerConfig(**{**SMALL, **bad})


# ----------------------------------------------------------------------------------------------- generation


class NoCache(nn.Module):
    """The same model without init_state/step, to exercise generate's re-run-the-context path."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)


PROMPT = [3, 14, 15, 92, 65]


def test_sampling_is_deterministic_for_a_seed():
    """The same seed gives the same sampled tokens; another seed gives others."""
    model = make()
    a = generate(model, PROMPT, max_new_tokens=20, temperature=1.0, top_k=20, seed=7)
    b = generate(model, PROMPT, max_new_tokens=20, temperature=1.0, top_k=20, seed=7)
    c = generate(model, PROMPT, max_new_tokens=20, temperature=1.0, top_k=20, seed=8)
    assert a == b
    assert a != c


@torch.no_grad()
def test_greedy_generation_equals_argmax_of_full_forwards():
    """temperature 0 returns the argmax continuation computed by hand with full forwards, cached or not."""
    model = make()
    context = list(PROMPT)
    for _ in range(10):
        context.append(int(model(torch.tensor([context]))[0, -1].argmax()))
    expected = context[len(PROMPT) :]
    assert generate(model, PROMPT, max_new_tokens=10, temperature=0) == expected
    assert generate(NoCache(model), PROMPT, max_new_tokens=10, temperature=0) == expected


@pytest.mark.parametrize("n", [1, 6])
def test_generation_returns_exactly_max_new_tokens_without_eos(n):
    """Without eos_id, generate returns exactly max_new_tokens new tokens."""
    assert len(generate(make(), PROMPT, max_new_tokens=n, seed=0)) == n


def test_generation_stops_after_eos():
    """Generation ends at the first eos_id it produces, which is the last token returned."""
    model = make()
    free = generate(model, PROMPT, max_new_tokens=12, temperature=0)
    eos = free[4]
    first = free.index(eos)
    assert generate(model, PROMPT, max_new_tokens=12, temperature=0, eos_id=eos) == free[: first + 1]


@pytest.mark.parametrize(
    ("prompt", "kwargs", "match"),
    [
        ([], dict(max_new_tokens=3), "empty"),
        (PROMPT, dict(max_new_tokens=0), "max_new_tokens"),
        (PROMPT, dict(max_new_tokens=3, temperature=-0.5), "temperature"),
        (PROMPT, dict(max_new_tokens=3, top_k=0), "top_k"),
    ],
)
def test_generate_rejects_bad_arguments(prompt, kwargs, match):
    """Bad generation arguments raise a ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        generate(make(), prompt, **kwargs)


def test_generation_restores_train_mode_and_training_still_works_after():
    """generate leaves a training model in train mode, and a backward pass afterwards works (no inference tensors)."""
    model = make().train()
    generate(model, PROMPT, max_new_tokens=3, seed=0)
    assert model.training
    ids = tokens(2, 9)
    F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------------------------- layers


def test_rope_at_explicit_positions_equals_rope_at_an_offset():
    """Rotating at positions offset..offset+T-1 given explicitly equals rotating with that offset."""
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 5, 3, 8)
    torch.testing.assert_close(rope(x, positions=torch.arange(11, 16)), rope(x, offset=11))


def test_rope_dot_products_depend_only_on_relative_position():
    """<rope(q, m), rope(k, n)> is the same for every (m, n) with the same m - n, and rotation keeps norms."""
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)
    dots = [(rope(q, offset=m) * rope(k, offset=m - 3)).sum(-1) for m in (3, 10, 500)]
    torch.testing.assert_close(dots[0], dots[1])
    torch.testing.assert_close(dots[0], dots[2])
    torch.testing.assert_close(rope(q, offset=7).norm(dim=-1), q.norm(dim=-1))


def test_rms_norm_computes_in_fp32_and_returns_the_input_dtype():
    """RMSNorm of a bf16 input is bf16 and matches the fp32 result rounded to bf16."""
    norm = RMSNorm(32)
    x = torch.randn(4, 32) * 5
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, norm(x.bfloat16().float()).bfloat16())
    torch.testing.assert_close(norm(x).pow(2).mean(-1), torch.ones(4), rtol=0, atol=1e-4)
