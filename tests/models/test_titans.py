"""Titans (lmm, mac, mag, mal): causality, exact step decoding, the memory as an in-context level, checks, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlplatform.errors import ConfigError
from nlplatform.levels import check_levels
from nlplatform.models.titans import VARIANTS, Titans, TitansConfig
from nlplatform.registry import build_model, model_config

SMALL = dict(
    d_model=32,
    n_layers=2,
    n_heads=2,
    vocab_size=53,
    memory_chunk_size=4,
    window=8,
    attn_heads=2,
    n_persistent=3,
    theta_max=0.2,
)
variants = pytest.mark.parametrize("variant", VARIANTS)


def make(variant: str, seed: int = 0, dtype=torch.float64, **overrides) -> Titans:
    torch.manual_seed(seed)
    return Titans(TitansConfig(variant=variant, **{**SMALL, **overrides})).to(dtype).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@variants
@torch.no_grad()
@pytest.mark.parametrize("t", [0, 6, 19])
def test_changing_later_tokens_never_changes_earlier_logits(variant, t):
    """Logits at positions < t ignore every token from t on (the memory reads after its own write, MAC's retrieval
    and attention see only earlier positions of the segment)."""
    model = make(variant)
    ids = tokens(2, 27)
    changed = ids.clone()
    changed[:, t:] = (changed[:, t:] + 7) % SMALL["vocab_size"]
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-6


@variants
@torch.no_grad()
@pytest.mark.parametrize("pieces", [(1,) * 13, (5, 1, 7), (13,), (3, 4, 6)], ids=["tokens", "5-1-7", "all", "3-4-6"])
def test_step_by_step_with_carried_state_equals_the_full_forward(variant, pieces):
    """Decoding in pieces of any size (across chunk and segment boundaries) reproduces the full forward exactly."""
    model = make(variant)
    ids = tokens(2, sum(pieces))
    full = model(ids)
    state = model.init_state(2, sum(pieces), dtype=torch.float64)
    outs, start = [], 0
    for n in pieces:
        logits, state = model.step(ids[:, start : start + n], state)
        outs.append(logits)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)
    assert state.length == sum(pieces)


@variants
def test_the_memory_chunk_size_is_a_model_setting(variant):
    """Unlike the delta rule's tiling, the memory chunk (gradients at chunk-start weights) changes the outputs."""
    ids = tokens(1, 20)
    with torch.no_grad():
        a = make(variant, memory_chunk_size=1)(ids)
        b = make(variant, memory_chunk_size=4)(ids)
    assert (a - b).abs().max() > 1e-10  # fp64: far above rounding (the effect is second order in theta)


@variants
def test_levels_are_the_memory_in_context_at_its_chunk_and_the_weights(variant):
    """Two levels: the memory (in-context, chunk memory_chunk_size) and all the weights (persistent)."""
    model = make(variant, memory_chunk_size=4)
    levels = {level.name: level for level in model.levels()}
    assert set(levels) == {"memory", "weights"}
    assert levels["memory"].scope == "in_context" and levels["memory"].chunk_size == 4
    assert levels["weights"].scope == "persistent"
    check_levels(model.levels(), model, seq_len=64)


@variants
def test_tiny_preset_forward_backward_gives_finite_gradients_for_every_parameter(variant):
    """One forward + backward of the tiny preset reaches every parameter (memory init weights, gates, persistent
    tokens, attention) with finite, non-zero gradients."""
    torch.manual_seed(0)
    model = build_model(model_config("titans", "tiny", vocab_size=257, variant=variant)).train()
    ids = torch.randint(0, 257, (2, 33))
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@variants
def test_meta_build_then_to_empty_and_init_weights_gives_a_working_model(variant):
    """Built on the meta device (as for large presets), materialised and initialised, the model runs."""
    cfg = TitansConfig(variant=variant, **SMALL)
    with torch.device("meta"):
        model = Titans(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(tokens(1, 10))
    assert torch.isfinite(out).all()


def test_persistent_tokens_change_the_output_and_can_be_switched_off():
    """N_p learnable tokens are prepended in every mixer; with n_persistent=0 the model still runs."""
    ids = tokens(1, 12)
    with torch.no_grad():
        with_p = make("lmm")(ids)
        model = make("lmm")
        for block in model.layers:
            block.mixer.persistent.zero_()
        zeroed = model(ids)
        none = make("lmm", n_persistent=0)(ids)
    assert (with_p - zeroed).abs().max() > 1e-6
    assert torch.isfinite(none).all()


def test_only_lmm_and_mac_decode_with_a_constant_size_state():
    """lmm and mac carry the memory alone; mag and mal also keep a growing attention cache and need max_len."""
    assert make("lmm").recurrent and make("mac").recurrent
    assert not make("mag").recurrent and not make("mal").recurrent
    with pytest.raises(ValueError, match="max_len"):
        make("mag").init_state(1)


def test_flops_per_token_adds_the_memory_and_attention_terms_to_six_n():
    """MFU accounting: 6N plus each mixer's memory term, plus the windowed attention for the hybrids."""
    lmm, mag = make("lmm"), make("mag")
    assert lmm.flops_per_token(64) > 6 * lmm.num_params(exclude_embeddings=True)
    attn = mag.layers[0].mixer.attn
    assert attn.flops_per_token(10_000) == attn.flops_per_token(SMALL["window"] + SMALL["n_persistent"])


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        (dict(variant="mat"), "variant"),
        (dict(n_heads=3), "divisible"),
        (dict(memory_depth=0), "memory_depth"),
        (dict(memory_chunk_size=0), "memory_chunk_size"),
        (dict(memory_activation="relu"), "memory_activation"),
        (dict(theta_max=0.0), "theta_max"),
        (dict(window=0), "window"),
        (dict(attn_heads=5, variant="mag"), "attn_heads"),
        (dict(n_persistent=-1), "n_persistent"),
    ],
)
def test_impossible_settings_raise_config_error(bad, key):
    """Settings that cannot build a model fail at config time with a ConfigError naming the field."""
    with pytest.raises(ConfigError, match=key):
        TitansConfig(**{**SMALL, **bad})


def test_registry_has_titans_with_its_presets():
    """`titans` is registered with the tiny and paper-size presets; variant is a config field."""
    cfg = model_config("titans", "tiny", variant="mac")
    assert isinstance(cfg, TitansConfig) and cfg.variant == "mac"
    for preset in ("340m", "760m", "1.3b"):
        assert model_config("titans", preset).d_model >= 1024


@pytest.mark.parametrize(("preset", "window", "chunk"), [("tiny", 64, 16), ("340m", 512, 64), ("1.3b", 512, 64)])
def test_gates_memory_and_windows_start_as_documented(preset, window, chunk):
    """The defaults docs/PAPER_COMPLIANCE.md lists where Titans is silent: theta = 0.1 sigmoid(.), eta and alpha
    sigmoids, the forgetting gate's bias at -4 (alpha ~ 0.018), per-head MLP memories 4x the head width with
    initial weights of std 1/sqrt(d_in), 4 persistent tokens, the window and the memory chunk of each size."""
    cfg = model_config("titans", preset, vocab_size=100)
    assert (cfg.theta_max, cfg.alpha_bias_init, cfg.memory_expansion, cfg.n_persistent) == (0.1, -4.0, 4, 4)
    assert (cfg.window, cfg.memory_chunk_size) == (window, chunk)
    if preset != "tiny":
        return
    torch.manual_seed(0)
    model = build_model(cfg)
    branch = next(m for m in model.modules() if hasattr(m, "gates") and hasattr(m, "memory_init"))
    H = cfg.n_heads
    assert torch.equal(branch.gates.bias[: 2 * H], torch.zeros(2 * H))
    assert torch.equal(branch.gates.bias[2 * H :], torch.full((H,), -4.0))
    first, last = branch.memory_init[0], branch.memory_init[-1]
    assert first.shape == (H, cfg.key_dim, 4 * cfg.key_dim) and last.shape == (H, 4 * cfg.key_dim, cfg.key_dim)
    for w in (first, last):
        assert abs(w.std().item() * w.shape[1] ** 0.5 - 1.0) < 0.05
