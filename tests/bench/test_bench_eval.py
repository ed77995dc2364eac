"""bench/bench_eval.py's long-document cases, in process at toy sizes: a document read through the lm-eval adapter
and generation after a prompt, for a recurrent family with test-time learning (HOPE) and its attention variant."""

from __future__ import annotations

import pytest


@pytest.fixture
def bench(load_bench):
    return load_bench("bench_eval")


def test_every_family_and_hope_attention_are_benchmarked(bench):
    from nlplatform import registry

    labels = [label for label, _, _ in bench.MODELS]
    assert labels == [*registry.FAMILIES, "hope_attention"]
    assert dict((label, overrides) for label, _, overrides in bench.MODELS)["hope_attention"] == {
        "variant": "attention"
    }


@pytest.mark.parametrize("overrides", [{}, {"variant": "attention"}], ids=["hope", "hope_attention"])
def test_a_long_document_and_generation_report_their_rates_and_peak_memory(bench, overrides):
    rolled = bench.rolling_long("hope", "tiny", overrides, 96, 32, "cpu")
    assert rolled["tokens_per_sec"] == pytest.approx(96 / rolled["seconds"]) and rolled["peak_gib"] > 0
    generated = bench.generation("hope", "tiny", overrides, 40, 3, "cpu")
    assert generated["prefill_tokens_per_sec"] > 0 and generated["decode_tokens_per_sec"] > 0
    assert generated["decode_peak_gib"] > 0
