"""Training-step throughput of every family: forward + backward + AdamW step on synthetic tokens, tokens/s, peak
memory and, for Transformer++, model FLOPs utilisation (MFU).

    python bench/bench_train_step.py                      # GPU: 340m at T = 2048, 4096, 8192, bf16, eager then compiled
    python bench/bench_train_step.py --preset tiny        # CPU: tiny at T = 256, 1024, 2048, fp32 (cpu-<n>threads)
    python bench/bench_train_step.py --families transformer,hope --seq-lens 4096 --compile off

Cases run in priority order: Transformer++ and HOPE at the middle length first (the comparison the platform's speed
goal names), then the other families at that length, then the other lengths, then everything again under
``torch.compile`` when asked. Each case is written to ``bench/results/train_step-<preset>-<device>.json`` as soon as
it is measured, and a later call skips the cases the file already holds (``--fresh`` starts over), so a GPU lent
for a short while never loses finished work. A case that runs out of memory is recorded as such.

Every case takes about the same number of tokens per step (``--tokens-per-step``, default 16,384 on a GPU: one
sequence of 16K, two of 8K, ...; 2,048 on a CPU: 8 x 256, 2 x 1024, 1 x 2048), so the figures compare families and
lengths at equal work: a family whose cost per token is flat in the sequence keeps its tokens/s as T grows (the note
under the table gives each family's tokens/s at the longest T over the shortest). On CUDA the step runs
under bf16 autocast with fp32 master weights (what training does); on a CPU in fp32.

Each row records which backend the family's token mixer ran (``kernels``: ``triton`` when the op's Triton entry point
was called during the timed steps, else ``reference``): ``backend="auto"`` falls back to the PyTorch reference where
the kernels do not take the inputs, and a GPU row is only comparable to others once it says which it measured.
Transformer++ has no such op (``-``).

MFU (Transformer++ only, where the FLOP count is standard): ``tokens/s x (6 N + 12 L d T) / peak`` with N the
non-embedding parameters, L layers, d the model width and T the sequence length (the PaLM appendix B count: matmul
FLOPs of forward and backward, causal attention counted in full), against the GPU's dense bf16 peak (H100 / H200:
989 TFLOP/s; ``--peak-tflops`` for others).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, device_and_label, in_child, median_seconds, peak_mem_gib, write_results

from nlplatform import registry

# (module, function): where each op hands its work to Triton; the families that use none have no token-mixer kernel
TRITON_ENTRY_POINTS = (
    ("kernels.delta_rule.autograd", "triton_gated_delta_rule"),
    ("kernels.titans_memory.autograd", "triton_titans_memory"),
    ("kernels.self_modifying.autograd", "triton_main_memory"),
)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, no sparsity


def case_key(row: dict) -> tuple:
    return (row["family"], row["preset"], row["seq_len"], row["batch"], row["compile"])


def plan(families: list[str], seq_lens: list[int], compiles: list[bool]) -> list[tuple[str, int, bool]]:
    """(family, T, compile) in priority order: Transformer++ and HOPE at the middle length, the rest at that length,
    then the other lengths shortest first; compiled cases after every eager one."""
    middle = seq_lens[len(seq_lens) // 2]
    ranked = [f for f in ("transformer", "hope") if f in families] + [
        f for f in families if f not in ("transformer", "hope")
    ]
    order = [(f, middle) for f in ranked] + [(f, t) for t in seq_lens if t != middle for f in ranked]
    return [(f, t, c) for c in compiles for f, t in order]


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def transformer_flops_per_token(model: torch.nn.Module, cfg, seq_len: int) -> float:
    """6 N + 12 L d T: N without the token embedding (a lookup, no matmul); the output projection stays in N."""
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("tok_emb."))
    return 6 * n + 12 * cfg.n_layers * cfg.d_model * seq_len


@contextlib.contextmanager
def counting_triton_calls(device: str):
    """Count calls into the ops' Triton entry points while the block runs (CUDA only: a CPU run never imports triton,
    and the ops pick the reference there)."""
    counter = {"calls": 0}
    patched = []
    if device == "cuda":
        for module_name, fn in TRITON_ENTRY_POINTS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # no triton installed: every op runs its reference
                continue
            real = getattr(module, fn)

            def counted(*args, _real=real, **kwargs):
                counter["calls"] += 1
                return _real(*args, **kwargs)

            setattr(module, fn, counted)
            patched.append((module, fn, real))
    try:
        yield counter
    finally:
        for module, fn, real in patched:
            setattr(module, fn, real)


def bench_one(
    name: str, preset: str, *, seq_len: int, batch: int, steps: int, vocab: int, device: str, compile_model: bool
) -> dict:
    torch.manual_seed(0)
    cfg = registry.model_config(name, preset, vocab_size=vocab)
    model = registry.build_model(cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    flops = transformer_flops_per_token(model, cfg, seq_len) if name == "transformer" else None
    forward = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    x = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step() -> None:
        with autocast:
            logits = forward(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with counting_triton_calls(device) as triton_calls:
        median = median_seconds(step, steps, device, warmup=3 if compile_model else 2)
    return {
        "kernels": "-" if name == "transformer" else ("triton" if triton_calls["calls"] else "reference"),
        "params": params,
        "step_ms_median": 1000 * median,
        "tokens_per_sec": batch * seq_len / median,
        "flops_per_token": flops,
        # GPU: peak allocated by torch; CPU: peak resident set of the whole process (an upper bound).
        "peak_mem_gib": peak_mem_gib(device),
    }


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| family | preset | params | T x batch | compile | kernels | ms/step | tokens/s | MFU | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("oom") or r.get("error"):
            lines.append(
                f"| {r['family']} | {r['preset']} | | {r['seq_len']}x{r['batch']} | {r['compile']} | | "
                f"{r.get('error', 'out of memory')} | | | |"
            )
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        lines.append(
            f"| {r['family']} | {r['preset']} | {r['params']:,} | {r['seq_len']}x{r['batch']} | {r['compile']} | "
            f"{r.get('kernels', '')} | {r['step_ms_median']:.1f} | {r['tokens_per_sec']:,.0f} | {mfu} | {r['peak_mem_gib']:.2f} |"
        )
    return lines


def ratio_note(rows: list[dict]) -> str:
    """HOPE's tokens/s as a share of Transformer++'s at each length (eager): the platform's speed goal is >= 50%. Then
    each family's tokens/s at the longest T over the shortest, once at equal tokens per step (batch shrinking as T
    grows: what batch parallelism is lost to a longer sequence) and once at batch 1 when the file holds those rows
    (``--tokens-per-step`` at most the shortest T: the cost per token against the sequence length alone)."""
    eager = [r for r in rows if "tokens_per_sec" in r and not r["compile"]]
    top = max((r["batch"] * r["seq_len"] for r in eager), default=0)
    groups = {
        "equal tokens per step": {
            (r["family"], r["seq_len"]): r["tokens_per_sec"] for r in eager if r["batch"] * r["seq_len"] == top
        },
        "batch 1": {(r["family"], r["seq_len"]): r["tokens_per_sec"] for r in eager if r["batch"] == 1},
    }
    fast = groups["equal tokens per step"]
    parts = [
        f"T={t}: {fast['hope', t] / fast['transformer', t]:.0%}"
        for (f, t) in sorted(fast)
        if f == "transformer" and ("hope", t) in fast
    ]
    lines = ["HOPE / Transformer++ tokens/s (eager): " + ", ".join(parts)] if parts else []
    for label, group in groups.items():
        lengths = sorted({t for _, t in group})
        if len(lengths) < 2:
            continue
        lo, hi = lengths[0], lengths[-1]
        scaling = [
            f"{f} {group[f, hi] / group[f, lo]:.2f}"
            for f in dict.fromkeys(f for f, _ in group)
            if (f, lo) in group and (f, hi) in group
        ]
        if scaling:
            lines.append(f"tokens/s at T={hi} / at T={lo}, {label} (eager): " + ", ".join(scaling))
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    device, device_name = device_and_label()
    gpu = device == "cuda"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="340m" if gpu else "tiny")
    parser.add_argument("--families", default=",".join(registry.FAMILIES), help="comma-separated, any order")
    parser.add_argument("--seq-lens", default="2048,4096,8192" if gpu else "256,1024,2048")
    parser.add_argument("--tokens-per-step", type=int, default=16384 if gpu else 2048)
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both" if gpu else "off")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (after the warm-up)")
    parser.add_argument("--vocab", type=int, default=32000 if gpu else 257)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--fresh", action="store_true", help="ignore the cases already in the results file")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="CPU: run the cases in this process (peak memory then a running high-water mark)",
    )
    args = parser.parse_args(argv)

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in registry.FAMILIES]
    if unknown:
        print(f"unknown families {unknown}; known: {', '.join(registry.FAMILIES)}", file=sys.stderr)
        return 2
    families = [f for f in families if args.preset in registry.get_spec(f).presets]
    seq_lens = sorted(int(t) for t in args.seq_lens.split(","))
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    peak = peak_tflops(device_name, args.peak_tflops) if gpu else None
    name = f"train_step-{args.preset}"
    path = args.out / f"{name}-{device_name.replace(' ', '_')}.json"
    rows = [] if args.fresh or not path.exists() else json.loads(path.read_text())["rows"]
    done = {case_key(r) for r in rows}

    for family, seq_len, compiled in plan(families, seq_lens, compiles):
        batch = max(1, args.tokens_per_step // seq_len)
        row = {"family": family, "preset": args.preset, "seq_len": seq_len, "batch": batch, "compile": compiled}
        if case_key(row) in done:
            continue
        case = f"{family:>16} T={seq_len:<5} x{batch:<3} compile={compiled!s:<5}"
        kwargs = dict(
            seq_len=seq_len, batch=batch, steps=args.steps, vocab=args.vocab, device=device, compile_model=compiled
        )
        try:
            if gpu or args.in_process:
                row |= bench_one(family, args.preset, **kwargs)
            else:  # a fresh process per case, so each peak resident set is the case's own
                row |= in_child(bench_one, family, args.preset, threads=torch.get_num_threads(), **kwargs)
        except torch.cuda.OutOfMemoryError:
            row["oom"] = True
        finally:
            if gpu:
                torch.cuda.empty_cache()
        if row.get("oom") or row.get("error"):
            print(f"{case}: {row.get('error', 'out of memory')}")
        else:
            if peak is not None and row["flops_per_token"] is not None:
                row["mfu"] = row["tokens_per_sec"] * row["flops_per_token"] / (peak * 1e12)
            print(f"{case}: {row['tokens_per_sec']:>10,.0f} tokens/s  {row['peak_mem_gib']:6.2f} GiB")
        rows.append(row)
        meta = {
            "preset": args.preset,
            "tokens_per_step": args.tokens_per_step,
            "peak_bf16_tflops": peak,
            "dtype": "bf16 autocast" if gpu else "fp32",
        }
        write_results(name, device_name, meta, rows, table(rows), ratio_note(rows), args.out)  # resumable
    return 0


if __name__ == "__main__":
    sys.exit(main())
