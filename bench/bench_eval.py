"""Evaluation throughput of the lm-eval adapter for every family: multiple-choice scoring and rolling perplexity.

    python bench/bench_eval.py [--preset tiny] [--requests 256] [--batch-size 16] [--doc-chars 20000] [--repeats 3]

Times ``NLPlatformLM.loglikelihood`` on HellaSwag-shaped requests (a context of about 200 characters, four endings of
about 40) and ``loglikelihood_rolling`` on one document (attention: lm-eval's windows of ``max_length``; recurrent
families: windows with the state carried), with randomly initialised models of the preset and the byte tokenizer.
Writes bench/results/eval-<device>.json and .md (median of ``--repeats`` timed runs after one warm-up).
"""

from __future__ import annotations

import argparse
import random
import string

import torch
from common import device_and_label, median_seconds, peak_mem_gib, write_results
from lm_eval.api.instance import Instance

from nlplatform import registry
from nlplatform.data.tokenizer import Tokenizer
from nlplatform.eval.harness import NLPlatformLM


def _text(rng: random.Random, n: int) -> str:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(n // 5 + 1)]
    return " ".join(words)[:n]


def bench_one(family: str, preset: str, args, device: str) -> dict:
    torch.manual_seed(0)
    model = registry.build_model(registry.model_config(family, preset, vocab_size=257))
    lm = NLPlatformLM(model=model, tokenizer=Tokenizer(), max_length=args.max_length, batch_size=args.batch_size,
                      device=device)  # fmt: skip
    rng = random.Random(0)
    pairs = []
    for _ in range(args.requests // 4):
        context = _text(rng, 200)
        pairs += [(context, " " + _text(rng, 40)) for _ in range(4)]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scored = sum(len(c) + len(x) for c, x in pairs)  # bytes = tokens for the byte tokenizer
    ll_s = median_seconds(lambda: lm.loglikelihood(requests, disable_tqdm=True), args.repeats, device, warmup=1)

    doc = _text(rng, args.doc_chars)
    rolling = [Instance("loglikelihood_rolling", {}, (doc,), 0)]
    roll_s = median_seconds(
        lambda: lm.loglikelihood_rolling(rolling, disable_tqdm=True), args.repeats, device, warmup=1
    )
    return {
        "family": family,
        "preset": preset,
        "recurrent": lm.recurrent,
        "requests": len(requests),
        "loglikelihood_requests_per_sec": len(requests) / ll_s,
        "loglikelihood_tokens_per_sec": scored / ll_s,
        "rolling_doc_tokens": len(doc.encode()),
        "rolling_tokens_per_sec": len(doc.encode()) / roll_s,
        "peak_mem_gib": peak_mem_gib(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--doc-chars", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, device_name = device_and_label()
    rows = []
    for family in registry.FAMILIES:
        if args.preset not in registry.get_spec(family).presets:
            continue
        row = bench_one(family, args.preset, args, device)
        print(
            f"{family:>16}: {row['loglikelihood_requests_per_sec']:8.1f} requests/s "
            f"({row['loglikelihood_tokens_per_sec']:,.0f} tokens/s)   rolling {row['rolling_tokens_per_sec']:,.0f} tokens/s"
        )
        rows.append(row)
    lines = [
        "| family | rolling reads | loglikelihood requests/s | scored tokens/s | rolling tokens/s | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mode = "state carried" if r["recurrent"] else f"windows of {args.max_length}"
        lines.append(
            f"| {r['family']} | {mode} | {r['loglikelihood_requests_per_sec']:.1f} | "
            f"{r['loglikelihood_tokens_per_sec']:,.0f} | {r['rolling_tokens_per_sec']:,.0f} | {r['peak_mem_gib']:.2f} |"
        )
    note = (
        f"{args.preset} presets (random init), byte tokenizer, batch size {args.batch_size}, max_length "
        f"{args.max_length}; {args.requests} HellaSwag-shaped requests (200-character context, 40-character endings); "
        f"rolling over one {args.doc_chars:,}-character document. Peak GiB: GPU allocated, or the process's running "
        "CPU RSS peak."
    )
    write_results("eval", device_name, vars(args), rows, lines, note)


if __name__ == "__main__":
    main()
