"""Evaluation throughput of the lm-eval adapter for every family: multiple-choice scoring, rolling perplexity, and
how both scale with the document's length.

    python bench/bench_eval.py [--preset tiny] [--requests 256] [--batch-size 16] [--doc-chars 20000] [--repeats 3]
                               [--doc-tokens 1024,4096,16384] [--prompt-tokens 4096] [--new-tokens 64]

Times ``NLPlatformLM.loglikelihood`` on HellaSwag-shaped requests (a context of about 200 characters, four endings of
about 40) and ``loglikelihood_rolling`` on one document (attention: lm-eval's windows of ``max_length``; recurrent
families: windows with the state carried), with randomly initialised models of the preset and the byte tokenizer
(one token per character). Writes bench/results/eval-<device>.json and .md (median of ``--repeats`` timed runs after
one warm-up).

Then, each in a fresh process so that its peak resident memory is its own: the rolling perplexity of one document of
each of ``--doc-tokens`` tokens (tokens/s and peak RSS; a recurrent family should read a 16K-token document at the
time per token and the memory of a 1K one), and greedy generation of ``--new-tokens`` tokens after a prompt of
``--prompt-tokens`` (the prompt read in one ``step``, then one token per ``step``). Written to
bench/results/eval_long-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import random
import string
import time

import torch
from common import device_and_label, in_child, median_seconds, peak_mem_gib, write_results
from lm_eval.api.instance import Instance

from nlplatform import registry
from nlplatform.data.tokenizer import Tokenizer
from nlplatform.eval.harness import NLPlatformLM


def _text(rng: random.Random, n: int) -> str:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(n // 5 + 1)]
    return " ".join(words)[:n]


# (row label, family, config overrides): every family, and HOPE's attention variant (softmax attention -> CMS)
MODELS = [(f, f, {}) for f in registry.FAMILIES] + [("hope_attention", "hope", {"variant": "attention"})]


def _model(family: str, preset: str, overrides: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return registry.build_model(registry.model_config(family, preset, vocab_size=257, **overrides))


def bench_one(family: str, preset: str, args, device: str, overrides: dict | None = None) -> dict:
    model = _model(family, preset, overrides or {})
    lm = NLPlatformLM(
        model=model, tokenizer=Tokenizer(), max_length=args.max_length, batch_size=args.batch_size, device=device
    )
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


def rolling_long(family: str, preset: str, overrides: dict, tokens: int, max_length: int, device: str) -> dict:
    """One document of ``tokens`` tokens through ``loglikelihood_rolling``, once (a fresh process: its peak RSS is
    this document's)."""
    lm = NLPlatformLM(
        model=_model(family, preset, overrides),
        tokenizer=Tokenizer(),
        max_length=max_length,
        batch_size=1,
        device=device,
    )
    doc = _text(random.Random(tokens), tokens)
    warm = [Instance("loglikelihood_rolling", {}, (_text(random.Random(0), 2 * max_length),), 0)]
    lm.loglikelihood_rolling(warm, disable_tqdm=True)  # first calls (allocator, lazy set-up) apart from the timing
    seconds = median_seconds(
        lambda: lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)], disable_tqdm=True),
        1,
        device,
        warmup=0,
    )
    return {"seconds": seconds, "tokens_per_sec": tokens / seconds, "peak_gib": peak_mem_gib(device)}


def full_forward(family: str, preset: str, overrides: dict, tokens: int, device: str) -> dict:
    """One forward over a whole document of ``tokens`` tokens, as training runs it but without the backward (grad mode
    off; HOPE's in-context levels still learn): the yardstick of a window step's cost per token."""
    model = _model(family, preset, overrides).to(device).eval()
    ids = torch.tensor([list(_text(random.Random(tokens), tokens).encode())], device=device)
    with torch.no_grad():
        seconds = median_seconds(lambda: model(ids), 1, device, warmup=1)
    return {"tokens_per_sec": tokens / seconds}


def generation(family: str, preset: str, overrides: dict, prompt_tokens: int, new_tokens: int, device: str) -> dict:
    """Greedy decoding after a prompt of ``prompt_tokens``: the prompt in one ``step`` (prefill), then one token per
    ``step`` (as ``nlplatform.generate`` decodes), each part timed on its own."""
    model = _model(family, preset, overrides).to(device).eval()  # built outside inference mode: trainable weights
    prompt = torch.tensor([list(_text(random.Random(prompt_tokens), prompt_tokens).encode())], device=device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        state = model.init_state(1, prompt_tokens + new_tokens, device, torch.float32)
        logits, state = model.step(prompt, state)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            logits, state = model.step(logits[:, -1:].argmax(-1), state)
        t2 = time.perf_counter()
    return {
        "prefill_tokens_per_sec": prompt_tokens / (t1 - t0),
        "decode_tokens_per_sec": new_tokens / (t2 - t1),
        "decode_peak_gib": peak_mem_gib(device),
    }


def bench_long(args, device: str, device_name: str) -> None:
    """The length sweep and generation of every model, each case in a fresh process."""
    lengths = [int(n) for n in args.doc_tokens.split(",")]
    threads = torch.get_num_threads()
    rows = []
    for label, family, overrides in MODELS:
        if args.preset not in registry.get_spec(family).presets:
            continue
        row: dict = {
            "model": label,
            "family": family,
            "recurrent": bool(_model(family, args.preset, overrides).recurrent),
        }
        for n in lengths:
            r = in_child(rolling_long, family, args.preset, overrides, n, args.max_length, device, threads=threads)
            row[f"rolling_{n}"] = r
            print(
                f"{label:>16}: {n:>6} tokens: "
                + (r.get("error") or f"{r['tokens_per_sec']:8,.0f} tokens/s, peak {r['peak_gib']:.2f} GiB"),
                flush=True,
            )
        f = in_child(full_forward, family, args.preset, overrides, min(lengths), device, threads=threads)
        row["forward"] = f
        g = in_child(
            generation, family, args.preset, overrides, args.prompt_tokens, args.new_tokens, device, threads=threads
        )
        row["generation"] = g
        print(f"{label:>16}: generation: {g}", flush=True)
        rows.append(row)
    lo, hi = min(lengths), max(lengths)

    def k(n: int) -> str:
        return f"{n / 1024:g}K"

    head = " | ".join(f"{k(n)} tokens/s | {k(n)} peak GiB" for n in lengths)
    lines = [
        f"| model | reads | {head} | s/token {k(hi)} / {k(lo)} | RSS {k(hi)} / {k(lo)} "
        f"| step / forward per token, {k(lo)} | prefill {k(args.prompt_tokens)} tokens/s | decode tokens/s "
        "| decode peak GiB |",
        "|---|---|" + "---|---|" * len(lengths) + "---|---|---|---|---|---|",
    ]
    for r in rows:
        cells, a, b = [], r[f"rolling_{lo}"], r[f"rolling_{hi}"]
        for n in lengths:
            c = r[f"rolling_{n}"]
            cells += ["error", "error"] if "error" in c else [f"{c['tokens_per_sec']:,.0f}", f"{c['peak_gib']:.2f}"]
        ok = "error" not in a and "error" not in b
        time_ratio = f"{a['tokens_per_sec'] / b['tokens_per_sec']:.2f}" if ok else "-"
        rss_ratio = f"{b['peak_gib'] / a['peak_gib']:.2f}" if ok else "-"
        fwd = r["forward"]
        step_ratio = (
            f"{fwd['tokens_per_sec'] / a['tokens_per_sec']:.2f}" if "error" not in a and "error" not in fwd else "-"
        )
        g = r["generation"]
        gen = (
            ["error"] * 3
            if "error" in g
            else [
                f"{g['prefill_tokens_per_sec']:,.0f}",
                f"{g['decode_tokens_per_sec']:,.1f}",
                f"{g['decode_peak_gib']:.2f}",
            ]
        )
        mode = "state carried" if r["recurrent"] else f"windows of {args.max_length}"
        lines.append(
            f"| {r['model']} | {mode} | "
            + " | ".join(cells)
            + f" | {time_ratio} | {rss_ratio} | {step_ratio} | "
            + " | ".join(gen)
            + " |"
        )
    note = (
        f"{args.preset} presets (random init), byte tokenizer (one token per character), max_length {args.max_length}; "
        f"each cell one run in a fresh process (peak GiB: that process's peak resident memory, model and interpreter "
        f"included; GPU: peak allocated). s/token {k(hi)} / {k(lo)}: time per token at {hi:,} tokens over "
        f"that at {lo:,} (1 = flat); RSS likewise. Step / forward: the time per token of the {lo:,}-token document read in "
        f"windows (as above) over that of one forward over the whole document (grad mode off). Decode: {args.new_tokens} greedy tokens, one step each, after a "
        f"{args.prompt_tokens:,}-token prompt read in one step. Attention families read rolling documents in "
        "lm-eval's windows and keep a KV cache that grows with the prompt when decoding."
    )
    write_results("eval_long", device_name, vars(args), rows, lines, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--doc-chars", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--doc-tokens", default="1024,4096,16384", help="document lengths of the length sweep")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", choices=["short", "long"], help="run one part (default: both)")
    args = parser.parse_args()
    device, device_name = device_and_label()
    if args.only != "long":
        bench_short(args, device, device_name)
    if args.only != "short":
        bench_long(args, device, device_name)


def bench_short(args, device: str, device_name: str) -> None:
    rows = []
    for label, family, overrides in MODELS:
        if args.preset not in registry.get_spec(family).presets:
            continue
        row = bench_one(family, args.preset, args, device, overrides) | {"family": label}
        print(
            f"{label:>16}: {row['loglikelihood_requests_per_sec']:8.1f} requests/s "
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
