"""HOPE and Hope-Attention: the CMS levels update exactly as Eq. 71 says (against a naive token loop), nested resets,
independent aggregation, persistent levels at their frequency, causality, exact decoding with test-time learning, the
ablation switches, first- vs second-order meta-gradients, sizes and configuration errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import nlplatform.models.hope as hope_module
from nlplatform.errors import ConfigError
from nlplatform.layers.cms import CMS
from nlplatform.levels import LevelScheduler, check_levels
from nlplatform.models.hope import Hope, HopeConfig
from nlplatform.registry import build_model, model_config

VOCAB = 23
# in-context CMS levels at 4 and 8 tokens (window 32), a persistent one at 64; memory chunks 2 and 4
SMALL = dict(
    d_model=32,
    n_layers=2,
    n_heads=2,
    vocab_size=VOCAB,
    memory_chunk_size=2,
    projection_chunk_size=4,
    cms_chunk_sizes=[4, 8, 64],
    context_len=32,
    cms_hidden=16,
    cms_inner_lr=0.3,
)
both = pytest.mark.parametrize("variant", ["hope", "attention"])


def make(variant: str = "hope", seed: int = 0, **overrides) -> Hope:
    torch.manual_seed(seed)
    return Hope(HopeConfig(variant=variant, **{**SMALL, **overrides})).to(torch.float64)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the CMS rule against a token loop


class _Stepper(torch.nn.Module):
    """Calls ``model.step`` through ``forward``, so ``functional_call`` can swap in explicit fast weights."""

    def __init__(self, model: Hope) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids, state):
        return self.model.step(ids, state)


def naive_cms_logits(model: Hope, ids: torch.Tensor) -> torch.Tensor:
    """Eq. 71 written out token by token, one sequence at a time, with every fast weight an explicit matrix.

    The model decodes one token per step with its own in-context learning switched off, reading each in-context
    level through the current weights swapped in by ``functional_call``. After token t, the gradient of its next-token
    loss with respect to those weights (autograd, through every path that uses them) is added to the level's buffer;
    when t + 1 is a multiple of the level's chunk the buffer is applied: ``W <- W - lr * buffer``. Nested CMS (Eq. 72,
    first order): at every chunk boundary of a level's parent, the level's initial weights move by the parent's
    inner learning rate times the level's summed gradients since the parent's last boundary, and the level restarts
    from them."""
    model.set_test_time_learning(False)
    stepper = _Stepper(model)
    out = []
    for b in range(ids.shape[0]):
        fast = {}  # name -> current weight (a leaf), per in-context level and layer
        init = {}
        levels = {}  # name -> (layer, level)
        for i, block in enumerate(model.layers):
            for lv in block.cms.fast_levels:
                for w in ("w1", "w3", "w2"):
                    name = f"model.layers.{i}.cms.mlps.{lv}.{w}.weight"
                    init[name] = getattr(block.cms.mlps[lv], w).weight.detach().clone()
                    fast[name] = init[name].clone().requires_grad_()
                    levels[name] = (i, lv)
        buffers = {n: torch.zeros_like(w) for n, w in fast.items()}
        context = {n: torch.zeros_like(w) for n, w in fast.items()}  # gradients since the parent's last boundary
        state = model.init_state(1)
        logits_b = []
        T = ids.shape[1]
        for t in range(T):
            logits, state = functional_call(stepper, fast, (ids[b : b + 1, t : t + 1], state), strict=False)
            logits_b.append(logits.detach())
            if t + 1 == T:
                break
            loss = F.cross_entropy(logits[0], ids[b, t + 1 : t + 2], reduction="sum")
            grads = torch.autograd.grad(loss, list(fast.values()), retain_graph=True, allow_unused=True)
            for name, g in zip(list(fast), grads):
                if g is not None:
                    buffers[name] += g
            for name in fast:
                i, lv = levels[name]
                cms = model.layers[i].cms
                if (t + 1) % cms.chunk_sizes[lv] == 0:
                    fast[name] = (fast[name] - cms.inner_lr(lv).detach() * buffers[name]).detach().requires_grad_()
                    context[name] += buffers[name]
                    buffers[name] = torch.zeros_like(buffers[name])
                parent = cms.nested_parent.get(lv)
                if parent is not None and (t + 1) % cms.chunk_sizes[parent] == 0:
                    init[name] = init[name] - cms.inner_lr(parent).detach() * context[name]
                    fast[name] = init[name].clone().requires_grad_()
                    context[name] = torch.zeros_like(context[name])
        out.append(torch.cat(logits_b, dim=1))
    model.set_test_time_learning(True)
    return torch.cat(out, dim=0)


@both
@pytest.mark.parametrize(
    "cms_variant,cms_hidden", [("sequential", 16), ("nested", 4), ("independent", 4)], ids=lambda x: str(x)
)
@pytest.mark.slow
def test_in_context_cms_levels_update_at_multiples_of_their_chunk_with_the_summed_chunk_gradients(
    variant, cms_variant, cms_hidden
):
    """The chunked forward (gradients per chunk of 4 tokens, dual-form fast weights, folded into dense deltas once
    larger: cms_hidden 4 folds after 8 tokens) equals the token loop of Eq. 71 at every position (fp64), for both
    in-context levels (chunks 4 and 8) in every CMS variant; and the updates matter (frozen logits differ)."""
    model = make(variant, cms_variant=cms_variant, cms_hidden=cms_hidden)
    ids = tokens(2, 19)
    with torch.no_grad():
        chunked = model(ids)
    naive = naive_cms_logits(model, ids)
    torch.testing.assert_close(chunked, naive, rtol=1e-9, atol=1e-10)
    model.set_test_time_learning(False)
    with torch.no_grad():
        frozen = model(ids)
    assert torch.allclose(chunked[:, :4], frozen[:, :4], atol=1e-12)  # nothing learnt before the first boundary
    assert (chunked[:, 5:] - frozen[:, 5:]).abs().max() > 1e-4


def _delta(cms: CMS, level: int, state, which: str = "w2") -> torch.Tensor:
    """The per-sequence change a fast state makes to one of a level's matrices, as a dense [B, in, out] tensor."""
    applied, dense = state.reading()
    lr = cms.inner_lr(level).detach()
    index = {"w1": 0, "w3": 1, "w2": 2}[which]
    total = 0.0 if dense is None else dense[index]
    if applied is not None:
        pairs = {"w1": (applied.x, applied.g1), "w3": (applied.x, applied.g3), "w2": (applied.h, applied.gy)}
        keys, grads = pairs[which]
        total = total - lr * keys.transpose(1, 2) @ grads
    return total


def test_nested_cms_restarts_a_level_from_the_initial_state_its_parent_learned():
    """Nested CMS (Eq. 72): the 4-token level's parent is the 8-token level (the persistent level at 64 is no
    in-context parent). At token 8 the child restarts, not from its meta-learned weights but from them moved by the
    parent's inner learning rate times the child's summed gradients over the parent's chunk: the change it reads is
    lr_parent / lr_child times the change the sequential model (identical up to that boundary) has learnt by then.
    After the boundary the two variants compute different logits."""
    nested = make("attention", cms_variant="nested", cms_hidden=64)
    sequential = make("attention", cms_variant="sequential", cms_hidden=64)
    cms = nested.layers[0].cms
    assert cms.nested_parent == {0: 1} and sequential.layers[0].cms.nested_parent == {}
    ids = tokens(2, 9)
    with torch.no_grad():
        logits_n, states_n, done = nested._process(ids, [None] * 2, 0, False)
        logits_s, states_s, _ = sequential._process(ids, [None] * 2, 0, False)
    assert done == 8
    child_n, child_s = states_n[0].cms[0], states_s[0].cms[0]
    assert child_n.applied is None and child_n.dense is None and child_n.base is not None  # restarted, at the base
    rho = cms.inner_lr(1).detach() / cms.inner_lr(0).detach()
    for w in ("w1", "w3", "w2"):
        torch.testing.assert_close(_delta(cms, 0, child_n, w), rho * _delta(cms, 0, child_s, w), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits_n[:, :8], logits_s[:, :8], rtol=1e-12, atol=1e-12)
    longer = tokens(2, 20)
    with torch.no_grad():
        assert (nested(longer)[:, 9:] - sequential(longer)[:, 9:]).abs().max() > 1e-6


def test_the_nested_recipe_has_two_in_context_levels_and_differs_from_sequential():
    """recipes/hope/tiny_nested.yaml: cms.0 (64) and cms.1 (128) are in context at its window of 256, cms.0's parent
    is cms.1, whose inner rate starts at half of cms.0's; on the recipe's model (narrowed to 64 wide for speed) the
    logits equal the sequential variant's for the first 128 tokens and differ from there (cms.0 restarts from what
    cms.1 learnt)."""
    from nlplatform.recipe import load_recipe
    from tests.train.conftest import ROOT

    cfg = load_recipe(ROOT / "recipes" / "hope" / "tiny_nested.yaml", ["model.vocab_size=23"]).model
    assert cfg.cms_variant == "nested" and cfg.cms_in_context == [True, True, False]
    small = dict(d_model=64, n_layers=1, n_heads=2, cms_hidden=32, cms_inner_lr=0.3)
    torch.manual_seed(0)
    nested = Hope(HopeConfig(**{**vars(cfg), **small})).double()
    torch.manual_seed(0)
    sequential = Hope(HopeConfig(**{**vars(cfg), **small, "cms_variant": "sequential"})).double()
    cms = nested.layers[0].cms
    assert cms.nested_parent == {0: 1}
    torch.testing.assert_close(cms.inner_lr(1), cms.inner_lr(0) / 2)
    ids = tokens(1, 200)
    with torch.no_grad():
        a, b = nested(ids), sequential(ids)
    torch.testing.assert_close(a[:, :128], b[:, :128], rtol=1e-10, atol=1e-10)
    assert (a[:, 128:] - b[:, 128:]).abs().max() > 1e-6


def test_independent_cms_aggregates_its_levels_with_learnable_weights():
    """Independent CMS (Eq. 74) reads one normalised input in parallel: with aggregation weights (1, 0, 0) it equals
    the first level alone, and the weights receive gradients."""
    torch.manual_seed(0)
    cms = CMS(8, 16, [4, 8, 64], [False, False, False], "independent").double()
    for p in cms.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        cms.agg.copy_(torch.tensor([1.0, 0.0, 0.0]))
    expected = x + cms.mlps[0](cms.norms[0](x))
    torch.testing.assert_close(cms(x), expected)
    cms(x).sum().backward()
    assert cms.agg.grad is not None and cms.agg.grad.abs().min() > 0


def test_fast_weights_are_kept_as_factors_until_dense_deltas_would_be_smaller():
    """The dual form: after 16 tokens an in-context level with a wide MLP holds its 16 tokens' factors, not a
    per-sequence copy of its weights; a narrow one has folded them into dense deltas [B, in, out]."""
    wide = make("attention", cms_hidden=64, cms_chunk_sizes=[4, 64])
    narrow = make("attention", cms_hidden=4, cms_chunk_sizes=[4, 64])
    with torch.no_grad():
        _, wide_states, _ = wide._process(tokens(2, 17), [None] * 2, 0, False)
        _, narrow_states, _ = narrow._process(tokens(2, 17), [None] * 2, 0, False)
    w = wide_states[0].cms[0]
    assert w.dense is None and w.applied.tokens == 16 and w.applied.x.shape == (2, 16, 32)
    n = narrow_states[0].cms[0]
    assert n.dense is not None and n.dense[0].shape == (2, 32, 4)


# ------------------------------------------------------------------------------------------- levels


def test_levels_cover_every_parameter_once_with_at_least_three_distinct_chunk_sizes():
    """HOPE declares the main memory (16), the projection memories (64), the in-context CMS level (64), two
    persistent CMS levels (2048, 8192) and the weights; every trainable parameter is in exactly one level."""
    model = build_model(model_config("hope", "tiny", vocab_size=257))
    levels = model.levels()
    check_levels(levels, model, seq_len=256)
    by_name = {lv.name: lv for lv in levels}
    assert [lv.name for lv in levels] == ["memory", "projections", "cms.0", "cms.1", "cms.2", "weights"]
    assert (by_name["memory"].chunk_size, by_name["projections"].chunk_size) == (16, 64)
    assert by_name["cms.0"].scope == "in_context" and by_name["cms.2"].scope == "persistent"
    assert len({lv.chunk_size for lv in levels if lv.chunk_size is not None}) >= 3
    # a persistent CMS level owns exactly its MLP and norm in every layer
    expected = {id(p) for b in model.layers for m in (b.cms.mlps[2], b.cms.norms[2]) for p in m.parameters()}
    assert {id(p) for p in by_name["cms.2"].params} == expected


def test_persistent_cms_levels_step_at_their_frequency():
    """With 2048 tokens per optimizer step, cms.1 (2048) changes at every step and cms.2 (8192) only at every 4th,
    by the summed gradients of the steps in between; the weights change every step."""
    model = make("attention", cms_chunk_sizes=[2048, 8192], context_len=32).float()
    levels = model.levels()
    scheduler = LevelScheduler(levels, tokens_per_step=2048)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = {
        "cms.0": model.layers[0].cms.mlps[0].w1.weight,
        "cms.1": model.layers[0].cms.mlps[1].w1.weight,
        "weights": model.layers[0].mixer.attn.wq.weight,
    }
    changed = {name: [] for name in watch}
    for step in range(8):
        before = {name: p.detach().clone() for name, p in watch.items()}
        opt.zero_grad()
        model(tokens(2, 12, seed=step)).float().logsumexp(-1).mean().backward()
        scheduler.before_optimizer_step(step)
        opt.step()
        for name, p in watch.items():
            changed[name].append(not torch.equal(before[name], p.detach()))
    assert changed["cms.0"] == [True] * 8 and changed["weights"] == [True] * 8
    assert changed["cms.1"] == [False, False, False, True] * 2
    assert scheduler.updates == {"cms.0": 8, "cms.1": 2, "weights": 8}


# ----------------------------------------------------------------------------------- causality, decoding


@both
@pytest.mark.parametrize("t", [0, 4, 13])
def test_changing_later_tokens_never_changes_earlier_logits(variant, t):
    """With test-time learning on, logits before t ignore every token from t on: the inner update after a chunk uses
    the token after it only for positions that come after that token."""
    model = make(variant)
    ids = tokens(2, 19)
    changed = ids.clone()
    changed[:, t:] = (changed[:, t:] + 5) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-6


@both
@pytest.mark.parametrize("learning", [True, False], ids=["learning", "frozen"])
def test_step_by_step_generation_equals_the_full_forward(variant, learning):
    """Decoding token by token (a prompt of 5, then single tokens, under inference mode as `generate` runs it) gives
    the full forward's logits, with the in-context levels learning as tokens arrive or frozen."""
    model = make(variant).eval()
    model.set_test_time_learning(learning)
    ids = tokens(2, 21)
    with torch.no_grad():
        full = model(ids)
    with torch.inference_mode():
        state = model.init_state(2)
        parts = [model.step(ids[:, :5], state)[0]]
        for t in range(5, 21):
            parts.append(model.step(ids[:, t : t + 1], state)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-9, atol=1e-10)
    assert state.length == 21


def _state_tensors(x, out: list) -> list:
    """Every tensor inside a decoding state (dataclasses, lists and tuples walked)."""
    if torch.is_tensor(x):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for t in x:
            _state_tensors(t, out)
    elif hasattr(x, "__dataclass_fields__"):
        for name in x.__dataclass_fields__:
            _state_tensors(getattr(x, name), out)
    return out


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_decoding_with_learning_keeps_no_graph_and_a_state_that_does_not_grow(mode):
    """Reading windows through `step` with the in-context levels learning, under inference mode (the eval harness)
    or no_grad: at a boundary of every in-context level no state tensor carries a grad_fn, and the state after 4N
    windows is as large as after N. (Between those boundaries the open chunk's taps keep its graph: the loss of its
    later tokens still reaches them, Eq. 71.) Inference mode used to come back as grad mode from the model's own
    guard, keeping every window's graph alive through the state."""
    model = make("hope").eval()
    ids = tokens(1, 4 + 8 * 16)
    sizes = {}
    with getattr(torch, mode)():
        state = model.init_state(1)
        for w in range(16):
            # windows of 8 after a first one of 12: the state is committed up to 4 tokens short of what was read
            # (the last chunk is learnt from once the token after it arrives), here 8, 16, ..., a boundary of both
            # in-context levels (chunks 4 and 8)
            model.step(ids[:, 0 if w == 0 else 4 + 8 * w : 4 + 8 * (w + 1)], state)
            if w + 1 in (4, 16):
                leaves = _state_tensors(state.layers, [])
                assert all(t.grad_fn is None for t in leaves), f"a state tensor keeps a graph after {w + 1} windows"
                sizes[w + 1] = sum(t.numel() for t in leaves)
    assert sizes[16] == sizes[4], sizes


_READ_WINDOWS = """
import resource, sys, torch
from nlplatform.models.hope import Hope, HopeConfig
torch.manual_seed(0)
model = Hope(HopeConfig(d_model=64, n_layers=2, n_heads=2, vocab_size=23, memory_chunk_size=8,
                        projection_chunk_size=16, cms_chunk_sizes=[16, 32, 1024], context_len=64, cms_hidden=64)).eval()
ids = torch.randint(0, 23, (1, 16 + 64 * 48))
peaks = {}
with torch.inference_mode():
    state = model.init_state(1)
    for w in range(48):
        model.step(ids[:, 0 if w == 0 else 16 + 64 * w : 16 + 64 * (w + 1)], state)
        if w + 1 in (12, 48):
            peaks[w + 1] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peaks[12], peaks[48])
"""


@pytest.mark.slow
def test_reading_four_times_as_many_windows_keeps_the_peak_resident_memory():
    """In a fresh process, a HOPE model learning in context reads 48 windows of 64 tokens under inference mode: the
    peak resident set after 48 windows is within 1.2x of that after 12 (it grew with every window before)."""
    import subprocess
    import sys

    from tests.train.conftest import ROOT

    out = subprocess.run(
        [sys.executable, "-c", _READ_WINDOWS], capture_output=True, text=True, cwd=ROOT, check=True, timeout=600
    )
    after_n, after_4n = (int(x) for x in out.stdout.split())
    assert after_4n <= 1.2 * after_n, f"peak RSS {after_n} kB after 12 windows, {after_4n} kB after 48"


def test_generate_runs_with_test_time_learning_under_inference_mode():
    """`nlplatform.generate` (inference mode) works with the in-context levels learning."""
    from nlplatform.generate import generate

    model = make("hope").float()
    new = generate(model, [1, 2, 3], max_new_tokens=12, temperature=0)
    assert len(new) == 12 and all(0 <= t < VOCAB for t in new)


# ------------------------------------------------------------------------------------ ablation switches


def _record_op_calls(monkeypatch) -> list[dict]:
    calls = []
    real = hope_module.self_modifying_titans

    def spy(*args, **kwargs):
        calls.append(
            {
                "static_k": kwargs["static_k"] is not None,
                "static_v": kwargs["static_v"] is not None,
                "momentum": kwargs["momentum_decay"] is not None,
                **{k: v for k, v in kwargs.items() if k in ("dgd", "retention", "chunk_size")},
            }
        )
        return real(*args, **kwargs)

    monkeypatch.setattr(hope_module, "self_modifying_titans", spy)
    return calls


MEMORY_STACK = {"mixer.memory_init", "mixer.in_proj", "mixer.conv"}
ABLATIONS = {
    # key=value: (the op's arguments that change, the parameters (module.name below the block) that change)
    "dgd=false": ({"dgd"}, set()),
    "memory_momentum=false": ({"momentum"}, {"mixer.momentum_logit"}),
    "memory_retention=false": ({"retention"}, set()),
    "adaptive_k=false": ({"static_k"}, MEMORY_STACK),
    "adaptive_v=false": ({"static_v"}, MEMORY_STACK),
    "cms_chunk_sizes=[]": (set(), {"cms.mlps", "cms.norms", "cms.log_inner_lr"}),
}


@pytest.mark.parametrize("switch", list(ABLATIONS))
def test_each_ablation_switch_changes_what_it_claims_and_nothing_else(monkeypatch, switch):
    """Each Table 6 switch changes only its own argument of the self-modifying memory (or only the CMS), only the
    parameters it must (a static k drops M_k from the memory stack and adds a projection stream), and the outputs."""
    key, value = switch.split("=")
    value = {"false": False, "[]": []}[value]
    calls = _record_op_calls(monkeypatch)
    base, ablated = make("hope"), make("hope", **{key: value})
    ids = tokens(1, 9)
    with torch.no_grad():
        a, b = base(ids), ablated(ids)
    assert (a - b).abs().max() > 1e-6
    expected_args, expected_params = ABLATIONS[switch]
    changed_args = {k for k in calls[0] if calls[0][k] != calls[-1][k]}
    assert changed_args == expected_args

    def shapes(model):
        return {n: tuple(p.shape) for n, p in model.named_parameters()}

    sa, sb = shapes(base), shapes(ablated)
    differing = {n for n in sa.keys() | sb.keys() if sa.get(n) != sb.get(n)}
    assert {".".join(n.split(".")[2:4]) for n in differing} == expected_params
    if key == "adaptive_k":
        assert ablated.layers[0].mixer.names == ("memory", "v", "eta", "alpha")
    if key == "cms_chunk_sizes":
        assert [lv.name for lv in ablated.levels()] == ["memory", "projections", "weights"]
        assert ablated.layers[0].cms.mlps[0].w1.out_features == ablated.cfg.hidden_dim


# ------------------------------------------------------------------------------------------ meta-gradients


def _loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@both
def test_second_order_meta_gradient_matches_finite_differences_and_first_order_differs(variant):
    """cms_second_order backpropagates through the inner updates: its gradient for an in-context level's initial
    weights matches a central finite difference (fp64); the first-order gradient treats the updates as constants (a
    different gradient) and still reaches the inner learning rate."""
    ids = tokens(2, 13)
    second = make(variant, cms_second_order=True)
    first = make(variant, cms_second_order=False)
    w = second.layers[0].cms.mlps[0].w1.weight
    _loss(second, ids).backward()
    _loss(first, ids).backward()
    direction = torch.randn_like(w)
    eps = 1e-4
    with torch.no_grad():
        w.add_(eps * direction)
        up = _loss(second, ids)
        w.sub_(2 * eps * direction)
        down = _loss(second, ids)
        w.add_(eps * direction)
    numeric = (up - down) / (2 * eps)
    analytic = (w.grad * direction).sum()
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-8)  # central difference: O(eps^2) + noise
    first_grad = (first.layers[0].cms.mlps[0].w1.weight.grad * direction).sum()
    assert (first_grad - analytic).abs() > 1e-6
    assert first.layers[0].cms.log_inner_lr.grad.abs().max() > 0


# ------------------------------------------------------------------------------------- presets and errors


@pytest.mark.parametrize(("preset", "head_dim"), [("tiny", 64), ("340m", 128), ("760m", 128), ("1.3b", 128)])
def test_every_preset_builds_with_its_levels_and_head_width(preset, head_dim):
    """Every preset builds (paper sizes on the meta device), declares its in-context and persistent levels, and has
    memory heads of 64 (tiny) or 128 (paper sizes: 1024 / 8, 1536 / 12, 2048 / 16) with memories of that width."""
    cfg = model_config("hope", preset, vocab_size=32000)
    with torch.device("meta"):
        model = build_model(cfg)
    scopes = {lv.name: lv.scope for lv in model.levels()}
    assert scopes["cms.0"] == "in_context" and scopes["cms.1"] == "persistent"
    assert cfg.key_dim == head_dim
    assert model.layers[0].mixer.memory_init[0].shape[-2:] == (head_dim, head_dim)
    if preset != "tiny":
        assert 0.8 < model.num_params() / {"340m": 340e6, "760m": 760e6, "1.3b": 1.3e9}[preset] < 1.3


def test_memory_gates_and_rails_start_as_documented():
    """The self-modifying memories' defaults docs/PAPER_COMPLIANCE.md lists: eta_max 0.3 and no inner-gradient clip
    (the rails bench/hope_rails.py found unneeded under the exact rule), the momentum decay starting at 0.5 (0.9
    diverged there), eta's read-out bias at 0 (eta starts at eta_max / 2), alpha's at +4 (retention 0.98), memories
    as wide as a head."""
    cfg = model_config("hope", "tiny", vocab_size=VOCAB)
    assert (cfg.eta_max, cfg.memory_max_grad_norm, cfg.memory_momentum_init) == (0.3, None, 0.5)
    assert cfg.memory_expansion == 1
    for start in (0.5, 0.9):
        torch.manual_seed(0)
        mixer = build_model(model_config("hope", "tiny", vocab_size=VOCAB, memory_momentum_init=start)).layers[0].mixer
        H = cfg.n_heads
        assert torch.equal(mixer.gate_b.detach(), torch.tensor([[0.0] * H, [4.0] * H]))
        torch.testing.assert_close(torch.sigmoid(mixer.momentum_logit.detach()), torch.full((H,), start))


def test_queries_keys_and_memory_inputs_are_unit_norm_after_a_causal_width_4_conv(monkeypatch):
    """arXiv Eq. 97 and §8.3: the memories' inputs x~, the queries q and (static ablation) the keys reach the op
    L2-normalised per head, after a causal depthwise convolution of width 4 (whose output at t depends on inputs
    t-3 .. t only); generated keys are normalised inside the op (tests/kernels/test_self_modifying_paper.py's loop
    does the same)."""
    seen = []
    real = hope_module.self_modifying_titans

    def spy(x, q, *args, **kwargs):
        seen.append((x, q, kwargs["static_k"]))
        return real(x, q, *args, **kwargs)

    monkeypatch.setattr(hope_module, "self_modifying_titans", spy)
    for adaptive_k in (True, False):
        seen.clear()
        model = make(adaptive_k=adaptive_k)
        with torch.no_grad():
            model(tokens(2, 11))
        for x, q, static_k in seen:
            for t in (x, q) if adaptive_k else (x, q, static_k):
                torch.testing.assert_close(t.norm(dim=-1), torch.ones_like(t[..., 0]), rtol=1e-12, atol=1e-12)
            assert (static_k is None) == adaptive_k
    conv = model.layers[0].mixer.conv
    assert conv.width == 4 and model.cfg.conv_size == 4
    u = torch.randn(1, 12, conv.weight.shape[0], dtype=torch.float64)
    changed = u.clone()
    changed[:, 6] += 1.0
    with torch.no_grad():
        moved = (conv(changed)[0] - conv(u)[0]).abs().amax(-1)[0]
    assert (moved[:6] == 0).all() and (moved[6:10] > 0).all() and (moved[10:] == 0).all()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(memory_chunk_size=3, projection_chunk_size=4), "divide one another"),
        (dict(cms_chunk_sizes=[6, 8]), "must each divide"),
        (dict(cms_chunk_sizes=[2, 64]), "multiple of the self-modifying"),
        (dict(cms_chunk_sizes=[0]), "positive token counts"),
        (dict(cms_variant="stacked"), "cms_variant"),
        (dict(variant="titans"), "model.variant"),
        (dict(memory_depth=3), "memory_depth"),
    ],
)
def test_impossible_settings_fail_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        HopeConfig(**{**SMALL, **overrides})


def test_tiny_forward_backward_gives_finite_gradients_for_every_parameter():
    """One fp32 training step of the tiny preset: finite loss, and a finite gradient for every parameter."""
    model = build_model(model_config("hope", "tiny", vocab_size=257, context_len=128))
    ids = torch.randint(0, 257, (2, 128))
    loss = _loss(model, ids)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
