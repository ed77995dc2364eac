"""DeltaNet and Gated DeltaNet: causality, recurrent decoding, the chunk size as a pure tiling, levels, init, checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nlplatform.errors import ConfigError
from nlplatform.generate import generate
from nlplatform.levels import check_levels
from nlplatform.models.deltanet import DeltaNet, DeltaNetConfig, GatedDeltaNetConfig
from nlplatform.registry import build_model, model_config

FAMILIES = {"deltanet": DeltaNetConfig, "gated_deltanet": GatedDeltaNetConfig}
SMALL = dict(d_model=64, n_layers=2, n_heads=2, vocab_size=97, chunk_size=16)


def make(family: str, seed: int = 0, dtype=torch.float32, **overrides) -> DeltaNet:
    torch.manual_seed(seed)
    return DeltaNet(FAMILIES[family](**{**SMALL, **overrides})).to(dtype).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


family = pytest.mark.parametrize("family", list(FAMILIES))


@family
@torch.no_grad()
@pytest.mark.parametrize("t", [0, 5, 30])
def test_changing_later_tokens_never_changes_earlier_logits(family, t):
    """Logits at positions <= t do not depend on the tokens after t."""
    model = make(family)
    ids = tokens(2, 40)
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % SMALL["vocab_size"]
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


@family
@torch.no_grad()
@pytest.mark.parametrize("length", [1, 7, 33, 100])
def test_forward_returns_finite_logits_for_any_length(family, length):
    """forward maps [B, T] ids to finite [B, T, vocab] logits for T = 1, odd T and T past a chunk."""
    logits = make(family)(tokens(3, length))
    assert logits.shape == (3, length, SMALL["vocab_size"])
    assert torch.isfinite(logits).all()


@family
@torch.no_grad()
@pytest.mark.parametrize(
    "pieces", [[1] * 20, [13, 1, 1, 22], [40]], ids=["token-by-token", "prompt-then-steps", "one-step"]
)
@pytest.mark.parametrize("conv_size", [4, 0], ids=["conv4", "no-conv"])
def test_step_by_step_with_carried_state_equals_the_full_forward(family, pieces, conv_size):
    """Recurrent decoding (O(1) state per layer) gives the full forward's logits, in fp64 to rounding."""
    model = make(family, dtype=torch.float64, conv_size=conv_size, allow_neg_eigval=family == "deltanet")
    length = sum(pieces)
    ids = tokens(2, length)
    full = model(ids)
    state = model.init_state(2, length)
    outs, start = [], 0
    for n in pieces:
        logits, state = model.step(ids[:, start : start + n], state)
        outs.append(logits)
        start += n
    assert state.length == length
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)


@family
@torch.no_grad()
def test_the_chunk_size_is_a_tiling_that_does_not_change_the_model(family):
    """The same weights give the same logits at chunk sizes 16, 64 and 256."""
    ids = tokens(2, 100)
    logits = {c: make(family, dtype=torch.float64, chunk_size=c)(ids) for c in (16, 64, 256)}
    torch.testing.assert_close(logits[16], logits[64], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits[256], logits[64], rtol=1e-10, atol=1e-10)


@family
def test_levels_are_a_per_token_memory_and_the_weights(family):
    """levels() is an in-context memory at chunk 1 with no parameters, then the weights owning every parameter."""
    model = make(family)
    memory, weights = model.levels()
    assert (memory.name, memory.scope, memory.chunk_size, memory.params) == ("memory", "in_context", 1, [])
    assert (weights.name, weights.scope, weights.chunk_size) == ("weights", "persistent", None)
    assert {id(p) for p in weights.params} == {id(p) for p in model.parameters()}
    assert ("gated" in memory.update) == (family == "gated_deltanet")
    check_levels(model.levels(), model, seq_len=2)


def test_gated_deltanet_decay_is_initialised_as_in_mamba2():
    """A = exp(A_log) ~ U(0, 16); softplus(dt_bias) = dt in [dt_min, dt_max]; so every initial log decay is < 0."""
    torch.manual_seed(0)
    model = DeltaNet(GatedDeltaNetConfig(**{**SMALL, "n_heads": 64, "head_dim": 8}))
    for block in model.layers:
        mixer = block.mixer
        A = mixer.A_log.exp()
        assert ((A > 0) & (A <= 16)).all() and A.mean() > 4  # a U(0, 16) sample of 64 has its mean near 8
        dt = F.softplus(mixer.dt_bias)
        assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all()
        assert mixer.A_log.ndim == mixer.dt_bias.ndim == 1  # 1-d: no weight decay (the optimizer's ndim rule)
    x = torch.randn(2, 5, SMALL["d_model"])
    g = -mixer.A_log.exp() * F.softplus(mixer.a_proj(x) + mixer.dt_bias)
    assert (g < 0).all()


@family
def test_tiny_preset_forward_backward_gives_finite_gradients_for_every_parameter(family):
    """One forward+backward of the tiny preset gives a finite, non-zero gradient for every parameter."""
    torch.manual_seed(0)
    model = build_model(model_config(family, "tiny", vocab_size=257)).train()
    ids = torch.randint(0, 257, (2, 70))
    F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@family
def test_meta_build_then_to_empty_and_init_weights_gives_a_working_model(family):
    """A model built on the meta device, materialised with to_empty and init_weights, runs."""
    with torch.device("meta"):
        model = DeltaNet(FAMILIES[family](**SMALL))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert torch.isfinite(model(tokens(1, 20))).all()


@family
def test_flops_per_token_adds_the_chunked_delta_rule_to_six_n(family):
    """flops_per_token = 6 N plus the chunked delta rule's products per layer, with the chunk capped by the window."""
    model = make(family)
    cfg = model.cfg
    H, K, V = cfg.n_heads, cfg.key_dim, cfg.value_dim
    n = model.num_params(exclude_embeddings=True)
    per_layer = 3 * H * (16 * (5 * K + 3 * V) + 6 * K * V)
    assert model.flops_per_token(128) == 6 * n + cfg.n_layers * per_layer
    assert model.flops_per_token(8) < model.flops_per_token(128)  # a window shorter than a chunk is one chunk


def test_gated_deltanet_widens_values_and_gates_the_output():
    """Gated DeltaNet doubles the value width and gates the output norm; DeltaNet does neither."""
    cfg = GatedDeltaNetConfig(**SMALL)
    assert (cfg.value_dim, cfg.output_gate) == (2 * cfg.key_dim, True)
    mixer = DeltaNet(cfg).layers[0].mixer
    assert mixer.g_proj is not None and mixer.o_proj.in_features == cfg.n_heads * cfg.value_dim
    assert DeltaNet(DeltaNetConfig(**SMALL)).layers[0].mixer.g_proj is None


@family
def test_greedy_generation_with_the_recurrent_state_equals_argmax_of_full_forwards(family):
    """generate() with the recurrent state picks the argmax of re-running the whole context."""
    model = make(family)
    prompt = [3, 14, 15, 92, 65]
    out = generate(model, prompt, max_new_tokens=12, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        (dict(chunk_size=48), "power of two"),
        (dict(chunk_size=512), "power of two"),
        (dict(n_heads=3), "divisible"),
        (dict(head_dim=0), "head_dim"),
        (dict(expand_v=0.3), "expand_v"),
        (dict(conv_size=-1), "conv_size"),
        (dict(dt_min=0.2), "dt_min"),
        (dict(a_init_max=0.0), "a_init_max"),
        (dict(d_model=0), "d_model"),
    ],
)
def test_impossible_settings_raise_config_error(bad, key):
    """Settings that cannot build a model fail at config time with a ConfigError naming the field."""
    with pytest.raises(ConfigError, match=key):
        GatedDeltaNetConfig(**{**SMALL, **bad})


def test_a_kernel_backend_this_install_lacks_is_a_config_error(monkeypatch):
    """Without triton installed, model.kernel_backend=triton fails at config time and lists what is available."""
    monkeypatch.setattr("nlplatform.models.deltanet.AVAILABLE_BACKENDS", ("reference",))
    with pytest.raises(ConfigError, match="kernel_backend='triton'.*available: auto, reference"):
        GatedDeltaNetConfig(**{**SMALL, "kernel_backend": "triton"})


def test_registry_has_both_families_with_their_own_configs():
    """Both names resolve to their own config class; the 1.3b Gated DeltaNet has FLA's head layout."""
    assert type(model_config("deltanet", "tiny")) is DeltaNetConfig
    cfg = model_config("gated_deltanet", "1.3b")
    assert type(cfg) is GatedDeltaNetConfig and (cfg.n_heads, cfg.key_dim, cfg.value_dim) == (6, 256, 512)
    assert math.isclose(cfg.n_heads * cfg.key_dim / cfg.d_model, 0.75)
