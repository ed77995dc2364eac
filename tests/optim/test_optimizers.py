"""The nested-learning optimizers: their first steps against the equations worked by hand, M3's slow level, the
paper's toy objective, a tiny language model, save and restore, and bad hyperparameters."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nlplatform.config import OptimConfig
from nlplatform.errors import ConfigError
from nlplatform.optim import DEFAULT_LR, OPTIMIZERS, ParamSplit, build_optimizer
from nlplatform.optim.dmgd import DeepMomentumGD
from nlplatform.optim.momentum import DeltaMomentum, GeneralizedMomentum
from nlplatform.optim.muon import M3, newton_schulz
from nlplatform.recipe import load_recipe, recipe_to_dict
from tests.train.conftest import needs_corpus

ROOT = Path(__file__).resolve().parents[2]


def two_steps(opt_cls, p0: torch.Tensor, grads: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """The parameter after each step of ``opt_cls`` fed the given gradients."""
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], **kwargs)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


P0 = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, -1.0]])
G1 = torch.tensor([[0.2, -0.1, 0.4], [0.0, 0.3, -0.2]])
G2 = torch.tensor([[-0.1, 0.5, 0.1], [0.2, -0.4, 0.3]])


def test_momentum_first_two_steps_follow_m_alpha_minus_lr_g():
    """m1 = -lr g1, W1 = W0 + m1; m2 = alpha m1 - lr g2, W2 = W1 + m2 (arXiv Eq. 33)."""
    lr, a = 0.1, 0.9
    w1, w2 = two_steps(GeneralizedMomentum, P0, [G1, G2], lr=lr, momentum=a)
    m1 = -lr * G1
    m2 = a * m1 - lr * G2
    torch.testing.assert_close(w1, P0 + m1)
    torch.testing.assert_close(w2, P0 + m1 + m2)


def test_preconditioned_momentum_stores_adams_normalised_gradient_as_its_value():
    """With precondition=adam, P(g) = g / (sqrt(v_hat) + eps), v = beta2 v + (1 - beta2) g^2 (Nested Learning arXiv §4.4
    and App. B)."""
    lr, a, b2, eps = 0.1, 0.9, 0.95, 1e-8
    w1, w2 = two_steps(GeneralizedMomentum, P0, [G1, G2], lr=lr, momentum=a, precondition="adam", beta2=b2, eps=eps)
    v1 = (1 - b2) * G1**2
    m1 = -lr * G1 / ((v1 / (1 - b2)).sqrt() + eps)
    v2 = b2 * v1 + (1 - b2) * G2**2
    m2 = a * m1 - lr * G2 / ((v2 / (1 - b2**2)).sqrt() + eps)
    torch.testing.assert_close(w1, P0 + m1)
    torch.testing.assert_close(w2, P0 + m1 + m2)


def test_delta_momentum_decays_its_memory_along_the_new_gradient():
    """m2 = m1 (alpha I - zeta g2h^T g2h) - lr g2 with g2h = g2 / ||g2|| (arXiv Eq. 48-49, decay step explicit)."""
    lr, a, z = 0.1, 0.9, 0.5
    w1, w2 = two_steps(DeltaMomentum, P0, [G1, G2], lr=lr, momentum=a, decay_lr=z)
    m1 = -lr * G1
    g2h = G2 / G2.norm()
    m2 = m1 @ (a * torch.eye(3) - z * g2h.T @ g2h) - lr * G2
    torch.testing.assert_close(w1, P0 + m1)
    torch.testing.assert_close(w2, P0 + m1 + m2)
    # vectors: the decay is the number alpha - zeta ||g_hat||^2 = alpha - zeta
    v1, v2 = two_steps(DeltaMomentum, P0[0], [G1[0], G2[0]], lr=lr, momentum=a, decay_lr=z)
    torch.testing.assert_close(v2, P0[0] - lr * G1[0] + (-lr * G1[0]) * (a - z) - lr * G2[0])


def test_delta_momentum_without_a_normalised_decay_uses_the_raw_gradient():
    """normalize_decay=false (optim.normalize_decay): m2 = m1 (alpha I - zeta g2^T g2) - lr g2 with the raw g2, the
    printed Eq. 48-49 with the decay step zeta made explicit."""
    lr, a, z = 0.1, 0.9, 0.5
    w1, w2 = two_steps(DeltaMomentum, P0, [G1, G2], lr=lr, momentum=a, decay_lr=z, normalize=False)
    m1 = -lr * G1
    m2 = m1 @ (a * torch.eye(3) - z * G2.T @ G2) - lr * G2
    torch.testing.assert_close(w1, P0 + m1)
    torch.testing.assert_close(w2, P0 + m1 + m2)
    normalised = two_steps(DeltaMomentum, P0, [G1, G2], lr=lr, momentum=a, decay_lr=z)[1]
    assert (normalised - w2).abs().max() > 1e-4


def test_dmgd_starts_as_gradient_descent_then_steps_with_its_learned_memory():
    """Step 1 is W - lr g1 (the memory starts as the identity); before step 2 the memory takes one gradient step on
    predicting g2 from (g1, 0), which with W2 = 0 moves only W2; step 2 reads M(g2, o1 = g1)."""
    lr, inner, keep, hidden = 0.1, 0.5, 0.9, 4
    opt_probe = DeepMomentumGD([torch.nn.Parameter(P0.clone())], hidden=hidden)
    w1_init = opt_probe._new_memory(P0, hidden)["w1"]  # the same generator seed gives the same initial W1
    w1, w2 = two_steps(DeepMomentumGD, P0, [G1, G2], lr=lr, hidden=hidden, inner_lr=inner, retention=keep)
    torch.testing.assert_close(w1, P0 - lr * G1)
    g1, g2 = G1.flatten(), G2.flatten()
    s2 = g2.pow(2).mean().sqrt()
    h_learn = torch.tanh(torch.stack((g1 / s2, torch.zeros_like(g1)), -1) @ w1_init.T)  # [n, hidden]
    # loss = mean((g1 + s2 * h W2^T - g2)^2) / s2^2; d/dW2 at W2 = 0:
    d_w2 = (2.0 / (g1.numel() * s2)) * ((g1 - g2)[:, None] * h_learn).sum(0)
    w2_mem, w1_mem = -inner * d_w2, keep * w1_init
    h_read = torch.tanh(torch.stack((g2 / s2, g1 / s2), -1) @ w1_mem.T)
    out2 = g2 + s2 * (h_read @ w2_mem)
    torch.testing.assert_close(w2, w1 - lr * out2.view_as(P0))


def test_muon_first_two_steps_are_nesterov_momentum_orthogonalised():
    """torch's Muon as configured: buf = mu buf + (1 - mu) g, update = NS((1 - mu) g + mu buf), lr scaled by
    0.2 sqrt(max(rows, cols)). Off CUDA its Newton-Schulz iteration runs in float32 (ours), so the match is close."""
    lr, mu = 0.01, 0.95
    p = torch.nn.Parameter(P0.clone())
    opt = build_optimizer([{"params": [p], "weight_decay": 0.0}], OptimConfig(name="muon", lr=lr, momentum=mu))
    scale = lr * 0.2 * math.sqrt(3)
    buf, expected = torch.zeros_like(P0), P0.clone()
    for g in (G1, G2):
        p.grad = g.clone()
        opt.step()
        buf = mu * buf + (1 - mu) * g
        expected = expected - scale * newton_schulz((1 - mu) * g + mu * buf)
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def test_muon_on_a_cpu_leaves_torchs_bf16_iteration_in_place_after_its_step():
    """The float32 iteration is swapped in for the step only: torch's own function is back afterwards, and the update
    differs from torch's bf16 one by bf16 rounding only (within 6% of a step)."""
    torch_iteration = torch.optim._muon._zeropower_via_newtonschulz
    ours, theirs = (torch.nn.Parameter(P0.clone()) for _ in range(2))
    for p in (ours, theirs):
        p.grad = G1.clone()
    build_optimizer([{"params": [ours], "weight_decay": 0.0}], OptimConfig(name="muon", lr=0.01)).step()
    assert torch.optim._muon._zeropower_via_newtonschulz is torch_iteration
    torch.optim.Muon([theirs], lr=0.01, weight_decay=0.0, adjust_lr_fn="match_rms_adamw").step()
    step = (P0 - ours.detach()).abs().max()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=6e-2 * step.item(), rtol=0)


@pytest.mark.parametrize("normalize", [False, True], ids=["printed", "normalized"])
def test_m3_first_two_steps_follow_algorithm_1(normalize):
    """With slow_every=1 the slow momentum absorbs the previous step's gradient at step 2:
    U1 = NS(g1) / (sqrt(v1_hat) + eps), U2 = (NS(b1 g1 + g2) + alpha NS(g1)) / (sqrt(v2_hat) + eps), W_t = W_{t-1} -
    lr U_t as printed, or lr 0.2 U_t / RMS(U_t) with normalize (the default)."""
    lr, b1, b2, b3, alpha, eps = 0.01, 0.9, 0.95, 0.9, 0.5, 1e-8
    w1, w2 = two_steps(
        M3,
        P0,
        [G1, G2],
        lr=lr,
        beta1=b1,
        beta2=b2,
        beta3=b3,
        slow_weight=alpha,
        slow_every=1,
        eps=eps,
        normalize=normalize,
    )

    def scaled(u: torch.Tensor) -> torch.Tensor:
        return 0.2 * u / u.square().mean().sqrt() if normalize else u

    v1 = (1 - b2) * G1**2
    e1 = P0 - lr * scaled(newton_schulz(G1) / ((v1 / (1 - b2)).sqrt() + eps))
    v2 = b2 * v1 + (1 - b2) * G2**2
    u2 = (newton_schulz(b1 * G1 + G2) + alpha * newton_schulz(G1)) / ((v2 / (1 - b2**2)).sqrt() + eps)
    torch.testing.assert_close(w1, e1)
    torch.testing.assert_close(w2, e1 - lr * scaled(u2))


def test_m3_printed_sum_form_follows_algorithm_1_step_by_step():
    """accumulate=sum, normalize=false is Alg. 1 as printed, written out here for 7 steps with a slow chunk of 3:
    M1 <- M1 + b1 g, V <- V + b2 g^2 every step; at the start of each later chunk M2 <- M2 + b3 (sum of the last
    chunk's gradients) and O2 = NS(M2); W <- W - lr (NS(M1) + alpha O2) / (sqrt(V) + eps)."""
    lr, b1, b2, b3, alpha, eps, every = 0.01, 0.9, 0.95, 0.8, 0.5, 1e-8, 3
    grads = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    p = torch.nn.Parameter(P0.clone())
    opt = M3(
        [p],
        lr=lr,
        beta1=b1,
        beta2=b2,
        beta3=b3,
        slow_weight=alpha,
        slow_every=every,
        eps=eps,
        accumulate="sum",
        normalize=False,
    )
    w, m1, m2, v, o2 = (
        P0.clone(),
        torch.zeros_like(P0),
        torch.zeros_like(P0),
        torch.zeros_like(P0),
        torch.zeros_like(P0),
    )
    for t, g in enumerate(grads, 1):
        if t > 1 and (t - 1) % every == 0:  # slow loop: the chunk that just ended
            m2 = m2 + b3 * sum(grads[t - 1 - every : t - 1])
            o2 = newton_schulz(m2)
        m1 = m1 + b1 * g
        v = v + b2 * g**2
        w = w - lr * (newton_schulz(m1) + alpha * o2) / (v.sqrt() + eps)
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), w, msg=f"step {t}")
    assert opt.state[p]["slow_updates"] == 2


def test_m3_slow_momentum_changes_exactly_every_slow_every_steps():
    """slow_every=3: the slow momentum is updated at steps 4 and 7 (with the sums of steps 1-3 and 4-6), never
    between."""
    p = torch.nn.Parameter(P0.clone())
    opt = M3([p], lr=0.01, slow_every=3)
    changed, before = [], torch.zeros_like(P0)
    grads = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    for step, g in enumerate(grads, 1):
        p.grad = g
        opt.step()
        slow = opt.state[p]["slow"].clone()
        if not torch.equal(slow, before):
            changed.append(step)
        before = slow
    assert changed == [4, 7]
    torch.testing.assert_close(opt.state[p]["slow"], 0.9 * sum(grads[:3]) + sum(grads[3:6]))
    assert opt.state[p]["slow_updates"] == 2


# ----------------------------------------------------------------------------------------- toy objective and LM

K, A, W = 10.0, 0.5, 5.0  # psi's constants (the paper gives none): k = 10, a = 0.5, w = 5


def psi(x: torch.Tensor) -> torch.Tensor:
    """The paper's toy objective (arXiv Eq. 53): psi(r, theta) = r^2 + k (r - theta + a sin(w r))^2."""
    r, theta = x[0, 0], x[0, 1]
    return r**2 + K * (r - theta + A * torch.sin(W * r)) ** 2


TOY = {  # optimizer -> settings for 200 steps on psi from (-3.5, 2)
    "adamw": dict(lr=0.05),
    "momentum": dict(lr=0.002, momentum=0.9),
    "delta_momentum": dict(lr=0.002, momentum=0.9, decay_lr=0.5),
    "dmgd": dict(lr=0.005),
    "muon": dict(lr=0.4, momentum=0.9),
    "m3": dict(lr=2.0, slow_every=5),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_decreases_the_papers_toy_objective(name):
    """From (r, theta) = (-3.5, 2), held as a 1x2 matrix so the orthogonalising optimizers apply, 200 steps bring
    psi below a tenth of its start (263). Learning rates differ per optimizer (normalised updates need larger
    ones: muon and m3 step by an orthogonalised, unit-scale direction). For delta momentum the gradient is normalised in
    the decay, so alpha - decay_lr * g^T g stays in [0.4, 0.9]."""
    x = torch.nn.Parameter(torch.tensor([[-3.5, 2.0]]))
    cfg = OptimConfig(name=name, weight_decay=0.0, warmup_steps=0, **TOY[name])
    opt = build_optimizer([{"params": [x], "weight_decay": 0.0}], cfg)
    start = psi(x).item()
    for _ in range(200):
        opt.zero_grad()
        psi(x).backward()
        opt.step()
    end = psi(x).item()
    assert end < 0.1 * start, (name, end, x.detach().tolist())


LM_LR = DEFAULT_LR  # the learning rates `nlplatform compare --optimizers` uses


def tiny_module(name: str, steps: int = 30, lr: float | None = None):
    from nlplatform.train.module import LMModule

    recipe = ROOT / "recipes" / "transformer" / "tiny.yaml"
    small = [
        "model.vocab_size=257",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "data.seq_len=64",
        "optim.warmup_steps=3",
        f"trainer.max_steps={steps}",
        f"optim.name={name}",
        f"optim.lr={lr or LM_LR[name]}",
    ]
    torch.manual_seed(0)
    module = LMModule(recipe_to_dict(load_recipe(recipe, small)))
    setup = module.configure_optimizers()
    return module, setup["optimizer"], setup["lr_scheduler"]["scheduler"]


TEXT = torch.tensor(list(b"the quick brown fox jumps over the lazy dog; " * 40), dtype=torch.long)


def lm_batch(step: int) -> torch.Tensor:
    starts = (torch.arange(8) * 37 + step * 11) % (len(TEXT) - 65)
    return torch.stack([TEXT[s : s + 65] for s in starts.tolist()])


def lm_step(module, opt, sched, step: int) -> float:
    ids = lm_batch(step)
    loss = F.cross_entropy(module(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_a_tiny_language_model_for_30_steps(name):
    """Tiny Transformer++ on a repeated sentence, each optimizer built from a recipe (its ``LM_LR``, warm-up and
    cosine, the parameter rules): the mean loss of the last 5 steps is below 60% of the first step's."""
    module, opt, sched = tiny_module(name)
    if name in ("muon", "m3"):
        assert isinstance(opt, ParamSplit)
        matrices = {id(p) for g in opt.parts[0].param_groups for p in g["params"]}
        assert id(module.model.tok_emb.weight) not in matrices and id(module.model.output_weight) not in matrices
        assert all(p.ndim == 2 for g in opt.parts[0].param_groups for p in g["params"])
    losses = [lm_step(module, opt, sched, s) for s in range(30)]
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses


def corpus_bytes(play: str) -> torch.Tensor:
    from nlplatform.data.corpus import default_corpus_dir

    return torch.tensor(list((default_corpus_dir() / f"{play}_gut.txt").read_bytes()), dtype=torch.long)


# The plain-gradient family's best learning rates on this 2-layer, 64-wide model over 80 steps of real text (tried:
# momentum 0.01-0.3, dmgd 0.03-0.3); the 4-layer tiny preset prefers DEFAULT_LR's larger ones.
REAL_TEXT_LR = {**DEFAULT_LR, "momentum": 0.03, "delta_momentum": 0.03, "dmgd": 0.1}


@pytest.mark.slow
@needs_corpus
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_beats_the_unigram_model_on_a_held_out_play(name):
    """Real text, which the repeated sentence is too easy to stand for: 80 steps on random windows of Hamlet (batch 8
    x 64 bytes, warm-up and cosine) bring the loss on Macbeth below that of a unigram model of Hamlet's bytes (about
    3.40 nats): the model learned more than byte frequencies. Measured over three data seeds: AdamW 2.84-2.97, Muon
    and M3 2.76-2.81, delta momentum 3.10-3.11, momentum 2.90-3.26, DMGD 3.27-3.29."""
    steps, train, held = 80, corpus_bytes("hamlet"), corpus_bytes("macbeth")
    counts = torch.bincount(train, minlength=257).double() + 1
    unigram = -(counts / counts.sum()).log()[held].mean().item()

    def windows(text: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        starts = torch.randint(0, len(text) - 65, (n,), generator=torch.Generator().manual_seed(seed))
        return torch.stack([text[s : s + 65] for s in starts.tolist()])

    module, opt, sched = tiny_module(name, steps, lr=REAL_TEXT_LR[name])
    for step in range(steps):
        ids = windows(train, 8, step)
        loss = F.cross_entropy(module(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    ids = windows(held, 32, seed=10_000)
    with torch.no_grad():
        held_out = F.cross_entropy(module(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()
    assert held_out < unigram, (held_out, unigram)


def test_m3_step_size_does_not_grow_as_gradients_shrink():
    """Alg. 1's printed update NS(M) / sqrt(V) grows like 1/|g| (why it diverges late in training); the normalised
    update (the default) is the same for g and g / 1000. (G2 has no zero entry: where g = 0 the printed step is
    NS(g) / eps, huge at any scale.)"""
    steps = {}
    for normalize in (False, True):
        for scale in (1.0, 1e-3):
            (w,) = two_steps(M3, P0, [G2 * scale], lr=0.01, normalize=normalize)
            steps[normalize, scale] = (P0 - w).norm().item()
    assert steps[False, 1e-3] == pytest.approx(1e3 * steps[False, 1.0], rel=1e-3)
    assert steps[True, 1e-3] == pytest.approx(steps[True, 1.0], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_save_and_restore_mid_run_gives_the_same_next_steps(name):
    """A model and optimizer restored from their state after 3 steps take exactly the steps of the uninterrupted run."""
    module, opt, sched = tiny_module(name)
    for s in range(3):
        lm_step(module, opt, sched, s)
    saved = (copy.deepcopy(module.state_dict()), copy.deepcopy(opt.state_dict()), sched.state_dict())
    straight = [lm_step(module, opt, sched, s) for s in range(3, 5)]
    other, opt2, sched2 = tiny_module(name)
    other.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert [lm_step(other, opt2, sched2, s) for s in range(3, 5)] == straight
    for a, b in zip(module.parameters(), other.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["optim.lr=-0.1"], "optim.lr must be > 0"),
        (["optim.name=m3", "optim.slow_every=0"], "optim.slow_every must be > 0"),
        (["optim.name=delta_momentum", "optim.decay_lr=0.95", "optim.momentum=0.9"], "must not exceed optim.momentum"),
        (["optim.momentum=1.0"], "optim.momentum must be in [0, 1)"),
        (["optim.name=m33"], "Did you mean 'm3'"),
    ],
    ids=["negative-lr", "slow-every-0", "decay-above-momentum", "momentum-1", "typo"],
)
def test_impossible_hyperparameters_are_refused_with_a_clear_message(overrides, fragment):
    with pytest.raises(ConfigError, match=re_escape(fragment)):
        load_recipe(ROOT / "recipes" / "hope" / "tiny.yaml", overrides)


def test_optimizer_classes_refuse_impossible_values_themselves():
    """Used without a recipe, the classes reject a negative lr and slow_every < 1 with ValueError."""
    p = [torch.nn.Parameter(P0.clone())]
    with pytest.raises(ValueError, match="lr must be >= 0"):
        GeneralizedMomentum(p, lr=-1.0)
    with pytest.raises(ValueError, match="slow_every must be >= 1"):
        M3(p, slow_every=0)
    with pytest.raises(ValueError, match="2-D matrices only"):
        M3([torch.nn.Parameter(torch.zeros(3))])


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps_tiny_hope_with_its_levels_param_groups(name):
    """HOPE's persistent levels come as separate parameter groups (own learning rates): every optimizer takes a few
    finite steps over them, and the orthogonalising ones get only 2-D hidden matrices."""
    from nlplatform.train.module import LMModule

    recipe = ROOT / "recipes" / "hope" / "tiny.yaml"
    small = [
        "model.vocab_size=257",
        "model.d_model=64",
        "model.n_layers=2",
        "data.seq_len=64",
        "trainer.max_steps=4",
        "optim.warmup_steps=1",
        f"optim.name={name}",
        f"optim.lr={LM_LR[name]}",
    ]
    torch.manual_seed(0)
    module = LMModule(recipe_to_dict(load_recipe(recipe, small)))
    setup = module.configure_optimizers()
    opt, sched = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    levels = {g["level"] for g in opt.param_groups}
    assert {"weights", "cms.1", "cms.2"} <= levels
    before = [p.detach().clone() for p in module.parameters()]
    losses = [lm_step(module, opt, sched, s) for s in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_dmgd_saves_its_random_generator_so_memories_drawn_after_a_resume_match(tmp_path):
    """DMGD draws a parameter's memory when the parameter first gets a gradient (a slow level's first release can
    come after a resume): the generator's state travels in the optimizer's state dict, loadable as data."""

    def fresh():
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
        return a, b, DeepMomentumGD([a, b], hidden=4, seed=3)

    a, b, opt = fresh()
    a.grad = torch.ones(4)
    opt.step()  # only a has a memory so far
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()
    a2, b2, opt2 = fresh()
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    a2.grad, b2.grad = torch.ones(4), torch.ones(4)
    opt2.step()
    assert torch.equal(opt2.state[b2]["w1"], opt.state[b]["w1"])
