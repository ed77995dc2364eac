"""The lm-eval adapter: its scores are the model's own log-probabilities, and recurrent rolling carries state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from nlplatform.data.tokenizer import Tokenizer
from nlplatform.eval.harness.adapter import NLPlatformLM
from nlplatform.models.deltanet import DeltaNet, GatedDeltaNetConfig
from nlplatform.models.transformer import Transformer, TransformerConfig

VOCAB = 257  # the byte tokenizer's ids


def make_model(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    if family == "transformer":
        model = Transformer(TransformerConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=VOCAB))
    else:
        model = DeltaNet(GatedDeltaNetConfig(d_model=64, n_layers=2, n_heads=2, vocab_size=VOCAB, chunk_size=16))
    return model.to(dtype).eval()


def make_lm(family: str, dtype: str = "float32", **kwargs) -> NLPlatformLM:
    model = make_model(family, getattr(torch, dtype))
    return NLPlatformLM(model=model, tokenizer=Tokenizer(), device="cpu", dtype=dtype, **kwargs)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    logprobs = F.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
    targets = ids[0, 1:]
    return logprobs[len(context) - 1 :].gather(-1, targets[len(context) - 1 :, None]).sum().item()


families = pytest.mark.parametrize("family", ["transformer", "gated_deltanet"])
PAIRS = [
    ("The quick brown", " fox"),
    ("A", " longer continuation here."),
    ("", "starts from nothing"),
    ("Question: why?\nAnswer:", " because"),
    ("x" * 40, " y"),
]


@families
def test_loglikelihood_is_the_sum_of_the_models_own_log_probabilities(family):
    """Batched, padded scoring equals summing log-softmax of a plain forward, empty context included (eot first)."""
    lm = make_lm(family, batch_size=2)
    out = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    tok = lm.tokenizer_
    for (context, continuation), (ll, _) in zip(PAIRS, out):
        ctx = tok.encode(context) if context else [tok.eot_id]
        cont = tok.encode(continuation)
        assert ll == pytest.approx(direct_logprob(lm.model, ctx, cont), abs=1e-4)


@families
def test_greedy_flag_is_true_exactly_when_the_continuation_is_the_argmax(family):
    """is_greedy holds for the model's own greedy continuation and not for a different one (token level: a random
    model's bytes need not be valid UTF-8)."""
    lm = make_lm(family)
    context = lm.tokenizer_.encode("To be, or not")
    ids = list(context)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    greedy = ids[len(context) :]
    other = [(t + 1) % VOCAB for t in greedy]
    (_, is_greedy), (_, is_other) = lm._loglikelihood_tokens(
        [(None, context, greedy), (None, context, other)], disable_tqdm=True
    )
    assert is_greedy and not is_other


def test_recurrent_rolling_with_carried_state_equals_one_full_forward_in_fp64():
    """A document of more than three windows (of 50 tokens, a boundary inside a 16-token chunk) read window by
    window with the state carried scores exactly what one forward over the whole document does."""
    lm = make_lm("gated_deltanet", dtype="float64", max_length=50)
    text = "Now is the winter of our discontent made glorious summer by this sun of York. " * 3
    tokens = lm.tokenizer_.encode(text)
    assert len(tokens) > 3 * 50
    (rolled,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    full = direct_logprob(lm.model, [lm.eot_token_id], tokens)
    assert rolled == pytest.approx(full, rel=1e-12, abs=1e-9)


def test_attention_rolling_scores_every_token_once_within_the_window():
    """For attention, a document shorter than the window is one forward; a longer one is scored in lm-eval's
    disjoint rolling windows (as its HF backend does), each token predicted exactly once."""
    lm = make_lm("transformer", max_length=32)
    short = "short text"
    tokens = lm.tokenizer_.encode(short)
    (ll,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,)]), disable_tqdm=True)
    assert ll == pytest.approx(direct_logprob(lm.model, [lm.eot_token_id], tokens), abs=1e-4)

    long = "all the world's a stage, and all the men and women merely players. " * 2
    tokens = lm.tokenizer_.encode(long)
    (ll,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(long,)]), disable_tqdm=True)
    expected = direct_logprob(lm.model, [lm.eot_token_id], tokens[:32])
    predicted = 32
    while predicted < len(tokens):  # lm-eval's windows: each predicts up to 32 new tokens from the 32 before them
        n = min(len(tokens) - predicted, 32)
        end = predicted + n
        expected += direct_logprob(lm.model, tokens[end - 33 : end - n], tokens[end - n : end])
        predicted = end
    assert ll == pytest.approx(expected, abs=1e-3)


@families
def test_generate_until_stops_at_the_stop_string_and_matches_greedy_decoding(family):
    """generate_until returns the greedy continuation cut before the first stop string."""
    lm = make_lm(family)
    context = "Once upon a time"
    (free,) = lm.generate_until(
        requests("generate_until", [(context, {"until": [], "max_gen_toks": 30})]), disable_tqdm=True
    )
    assert len(free) > 0
    stop = free[5:7]
    (cut,) = lm.generate_until(
        requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 30})]), disable_tqdm=True
    )
    assert cut == free.split(stop)[0]


def test_bad_arguments_are_user_errors():
    """A missing model, an unknown dtype or a zero batch size fail with a UserError, not a traceback."""
    from nlplatform.errors import UserError

    with pytest.raises(UserError, match="pretrained"):
        NLPlatformLM()
    with pytest.raises(UserError, match="dtype"):
        NLPlatformLM(model=make_model("transformer"), tokenizer=Tokenizer(), dtype="float8")
    with pytest.raises(UserError, match="batch_size"):
        make_lm("transformer", batch_size=0)


def test_loglikelihood_with_a_bpe_tokenizer_scores_the_continuations_tokens():
    """With a BPE tokenizer the continuation is the tail of encode(context + continuation) (lm-eval's split), and
    its score is the model's own log-probability of those tokens."""
    from nlplatform.data.tokenizer import EOT_TOKEN, train_bpe

    docs = ["the cat sat on the mat and the dog sat on the log " * 20, "a bird in the hand is worth two " * 20]
    backend = train_bpe(docs, 300)
    tok = Tokenizer(backend, name="bpe-300", eot_id=backend.token_to_id(EOT_TOKEN))
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size)).eval()
    lm = NLPlatformLM(model=model, tokenizer=tok, device="cpu")
    pairs = [("the cat sat on", " the mat"), ("a bird", " in the hand"), ("", "the dog")]
    out = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (ll, _) in zip(pairs, out):
        if context:
            ctx = tok.encode(context)
            cont = tok.encode(context + continuation)[len(ctx) :]
        else:
            ctx, cont = [tok.eot_id], tok.encode(continuation)
        assert ll == pytest.approx(direct_logprob(model, ctx, cont), abs=1e-4)


def test_batches_hold_at_most_batch_size_requests_and_a_window_budget_of_tokens():
    """Long contexts (recurrent families read them whole) get smaller batches: at most batch_size requests and
    batch_size * max_length padded tokens per batch, a request longer than that alone."""
    lm = make_lm("gated_deltanet", batch_size=4, max_length=10)  # budget: 40 padded tokens
    lengths = {0: 100, 1: 30, 2: 12, 3: 10, 4: 10, 5: 5, 6: 5, 7: 5, 8: 5, 9: 5}
    batches = lm._batches(list(lengths), lengths.__getitem__)
    assert batches == [[0], [1], [2, 3, 4], [5, 6, 7, 8], [9]]
    assert sorted(i for b in batches for i in b) == list(lengths)
