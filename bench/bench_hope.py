"""HOPE's training-step speed against Transformer++, and the cost of its test-time learning at the paper's widths.

    python bench/bench_hope.py [--steps 3] [--seq-len 256] [--batch 4] [--skip-scale] [--scale-layers N]
                               [--scale-seq-len T] [--baseline CHECKOUT]

1. Speed: forward + backward + AdamW step (tokens/s, step ms, peak memory) at d_model 256, 4 layers, B x T = 4 x 256,
   vocab 257, of Transformer++ tiny, HOPE tiny with its in-context CMS level learning and frozen, Hope-Attention
   tiny learning and frozen, and Titans tiny. The goal: HOPE (learning) >= 0.25x Transformer++ tokens/s.
2. Scale: HOPE's ``340m`` preset (width 1024, 8 memory heads, window 4096, vocab 32000), one forward + backward at
   batch 1, learning against frozen: tokens/s, peak memory, and the memory the in-context fast state holds at the end
   of the window against one dense per-sequence copy of the in-context MLPs' weights, at T = 4096. On CPU it keeps
   the widths but runs 2 layers (about 14 GiB and a minute a step on 2 threads; ``--scale-seq-len`` shortens the
   window where memory is short); on CUDA the preset's depth.

``--baseline CHECKOUT`` (a clone of another revision) also times the HOPE speed rows on that checkout's code, in the
same run and the same way, and reports this tree's tokens/s over the baseline's.

On CUDA steps run under bf16 autocast, on CPU in fp32. Every row runs in a fresh spawned process, so its peak memory
(CPU: the process's peak resident set; CUDA: torch's peak allocation) is its own. Writes bench/results/hope-<device>
.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import device_and_label, in_child, peak_mem_gib, wall_times, write_results
from torch.utils.flop_counter import FlopCounterMode

from nlplatform import registry

GOAL = 0.25  # HOPE (learning) tokens/s over Transformer++ tokens/s
SPEED_VOCAB = 257
SCALE_VOCAB = 32000
SCALE_PRESET = "340m"

# (row name, family, config overrides) of the speed table; the first row is the yardstick of the ratios
SPEED_ROWS: list[tuple[str, str, dict]] = [
    ("Transformer++", "transformer", {}),
    ("HOPE (learning)", "hope", {"context_len": 256}),
    ("HOPE (frozen)", "hope", {"context_len": 256, "test_time_learning": False}),
    ("Hope-Attention (learning)", "hope", {"context_len": 256, "variant": "attention"}),
    ("Hope-Attention (frozen)", "hope", {"context_len": 256, "variant": "attention", "test_time_learning": False}),
    ("Titans", "titans", {}),
]


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def speed_row(
    name: str, family: str, overrides: dict, *, seq_len: int, batch: int, steps: int, warmup: int, device: str
) -> dict:
    """One speed row, in a child process: forward + backward + AdamW step of a tiny model."""
    torch.manual_seed(0)
    cfg = registry.model_config(family, "tiny", vocab_size=SPEED_VOCAB, **overrides)
    model = registry.build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    x = torch.randint(0, SPEED_VOCAB, (batch, seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step() -> None:
        with _autocast(device):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = wall_times(step, steps, device, warmup)
    median = statistics.median(times)
    peak = peak_mem_gib(device)
    with FlopCounterMode(display=False) as flops:  # one more step, untimed: the FLOPs torch's matmuls and convs do
        step()
    return {
        "row": name,
        "family": family,
        "preset": "tiny",
        "overrides": overrides,
        "learning": bool(getattr(model, "learning", False)),
        "params": sum(p.numel() for p in model.parameters()),
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "seq_len": seq_len,
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "step_ms_median": 1000 * median,
        "step_ms_min": 1000 * min(times),
        "step_ms_max": 1000 * max(times),
        "tokens_per_sec": batch * seq_len / median,
        "peak_mem_gib": peak,
        "gflop_per_step": flops.get_total_flops() / 1e9,
        "gflop_per_sec": flops.get_total_flops() / 1e9 / median,
    }


def baseline_row(checkout: Path, name: str, family: str, overrides: dict, *, threads: int, **kw) -> dict:
    """``speed_row`` on another checkout's code: a fresh interpreter whose ``nlplatform`` and ``kernels`` come from
    ``checkout`` (PYTHONPATH goes before the installed tree), timing with this file's loop. Its peak memory is its
    own process's."""
    bench = Path(__file__).resolve().parent
    code = (
        "import json, sys, torch\n"
        f"sys.path.insert(0, {str(bench)!r}); torch.set_num_threads({threads})\n"
        "import nlplatform, bench_hope\n"
        f"row = bench_hope.speed_row({name!r}, {family!r}, {overrides!r}, **{kw!r})\n"
        "row['code'] = nlplatform.__file__\n"
        "print(json.dumps(row))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=checkout, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(row["code"]).resolve().is_relative_to(checkout.resolve()):
        return {"error": f"the baseline imported {row['code']}, not the checkout {checkout}"}
    return row


def against_baseline(checkout: Path, repeats: int, *, device: str, threads: int, **kw) -> list[dict]:
    """The HOPE speed rows on this tree and on ``checkout``, alternating ``repeats`` times (a fresh process each), so
    that drifts of a shared CPU hit both alike: per row the medians of the runs' tokens/s and their ratio."""
    rev = _revision(checkout)
    out = []
    for name, family, overrides in [r for r in SPEED_ROWS if r[0].startswith("HOPE (")]:
        this, base = [], []
        for _ in range(repeats):
            this.append(in_child(speed_row, name, family, overrides, warmup=1, device=device, threads=threads, **kw))
            base.append(baseline_row(checkout, name, family, overrides, warmup=1, device=device, threads=threads, **kw))
        failed = [r["error"] for r in this + base if "error" in r]
        if failed:
            print(f"{name} against {rev}: {failed[0]}")
            out.append({"row": name, "baseline": rev, "error": failed[0]})
            continue
        t, b = [r["tokens_per_sec"] for r in this], [r["tokens_per_sec"] for r in base]
        row = {
            "row": name,
            "baseline": rev,
            "this_runs": t,
            "baseline_runs": b,
            "this_tokens_per_sec": statistics.median(t),
            "baseline_tokens_per_sec": statistics.median(b),
            "this_peak_gib": max(r["peak_mem_gib"] for r in this),
            "baseline_peak_gib": max(r["peak_mem_gib"] for r in base),
        }
        row["ratio"] = row["this_tokens_per_sec"] / row["baseline_tokens_per_sec"]
        print(
            f"{name} against {rev}: {row['this_tokens_per_sec']:,.0f} vs {row['baseline_tokens_per_sec']:,.0f} "
            f"tokens/s, {row['ratio']:.3f}x"
        )
        out.append(row)
    return out


def _revision(checkout: Path) -> str:
    proc = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or str(checkout)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def fast_state_bytes(model, ids: torch.Tensor, device: str) -> dict:
    """The in-context CMS levels' fast state after reading ``ids`` (the state at the last committed boundary), by
    kind, and what one dense per-sequence copy of those levels' weights (w1, w3, w2, in the weights' dtype) takes."""
    with torch.no_grad(), _autocast(device):
        _, states, committed = model._process(ids, [None] * len(model.layers), 0, False)
    applied = dense = pending = applied_tokens = 0
    for st in states:
        for top in st.cms if st is not None and st.cms is not None else []:
            for fs in (top, None if top is None else top.base):  # nested CMS: the parent-learnt initial state too
                if fs is None:
                    continue
                if fs.applied is not None:
                    applied += _nbytes(fs.applied.astuple())
                    applied_tokens = max(applied_tokens, fs.applied.tokens)
                if fs.dense is not None:
                    dense += _nbytes(fs.dense)
                for tap in fs.pending:
                    pending += _nbytes((tap.x, tap.z1, tap.z3, tap.h, tap.zy, *(tap.grads or ())))
    copy = 0
    for block in model.layers:
        for lv in block.cms.fast_levels:
            mlp = block.cms.mlps[lv]
            copy += ids.shape[0] * _nbytes((mlp.w1.weight, mlp.w3.weight, mlp.w2.weight))
    return {
        "committed_tokens": committed,
        "fast_state_bytes": applied + dense + pending,
        "fast_state_applied_bytes": applied,
        "fast_state_dense_bytes": dense,
        "fast_state_pending_bytes": pending,
        "fast_state_applied_tokens": applied_tokens,
        "dense_copy_bytes": copy,
    }


def scale_row(learning: bool, *, n_layers: int, seq_len: int, steps: int, warmup: int, device: str) -> dict:
    """One scale row, in a child process: forward + backward of the 340m preset's widths at batch 1, then the fast
    state after a no-grad read of the same window."""
    torch.manual_seed(0)
    cfg = registry.model_config(
        "hope", SCALE_PRESET, vocab_size=SCALE_VOCAB, n_layers=n_layers, test_time_learning=learning
    )
    model = registry.build_model(cfg).to(device)
    x = torch.randint(0, SCALE_VOCAB, (1, seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step() -> None:
        with _autocast(device):
            logits = model(inputs)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        model.zero_grad(set_to_none=True)

    times = wall_times(step, steps, device, warmup)
    peak = peak_mem_gib(device)  # read before the state measurement's forward
    median = statistics.median(times)
    row = {
        "row": f"HOPE {SCALE_PRESET} widths, {n_layers} layers ({'learning' if learning else 'frozen'})",
        "learning": bool(model.learning),
        "params": sum(p.numel() for p in model.parameters()),
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_layers": n_layers,
        "cms_width": cfg.cms_width,
        "cms_chunk_sizes": list(cfg.cms_chunk_sizes),
        "context_len": cfg.context_len,
        "seq_len": seq_len,
        "batch": 1,
        "steps": steps,
        "warmup": warmup,
        "step_ms_median": 1000 * median,
        "step_ms_min": 1000 * min(times),
        "step_ms_max": 1000 * max(times),
        "tokens_per_sec": seq_len / median,
        "peak_mem_gib": peak,
    }
    return {**row, **fast_state_bytes(model, inputs, device)}


def _gib(b: int) -> str:
    return f"{b / 2**30:.3f} GiB" if b >= 2**27 else f"{b / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per speed row (Transformer++: at least 10)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--skip-scale", action="store_true", help="only the speed table")
    parser.add_argument("--scale-layers", type=int, default=None, help="layers of the scale rows (CPU: 2, CUDA: 20)")
    parser.add_argument("--scale-seq-len", type=int, default=None, help="T of the scale rows (default 4096)")
    parser.add_argument("--scale-steps", type=int, default=None, help="timed scale steps (CPU: 1, no warm-up; CUDA: 3)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a checkout of another revision: its HOPE speed rows are timed in the same run",
    )
    parser.add_argument("--repeats", type=int, default=3, help="with --baseline: alternating runs per tree and row")
    args = parser.parse_args()
    device, label = device_and_label()
    threads = torch.get_num_threads()
    cpu = device == "cpu"
    print(f"device {label}, {'fp32' if cpu else 'bf16 autocast'}")

    # ---------------------------------------------------------------------------------------------- speed
    speed = []
    for name, family, overrides in SPEED_ROWS:
        steps, warmup = (max(10, args.steps), 2) if family == "transformer" else (args.steps, 1)
        r = in_child(
            speed_row,
            name,
            family,
            overrides,
            seq_len=args.seq_len,
            batch=args.batch,
            steps=steps,
            warmup=warmup,
            device=device,
            threads=threads,
        )
        r = {"row": name, "family": family, "overrides": overrides, **r}
        if "error" in r:
            print(f"{name:>26}: {r['error']}")
        else:
            print(
                f"{name:>26}: {r['tokens_per_sec']:>8,.0f} tokens/s  {r['step_ms_median']:8.1f} ms/step "
                f"(min {r['step_ms_min']:.1f}, max {r['step_ms_max']:.1f})  {r['peak_mem_gib']:.2f} GiB"
            )
        speed.append(r)
    versus = []
    if args.baseline is not None:
        versus = against_baseline(
            args.baseline,
            args.repeats,
            seq_len=args.seq_len,
            batch=args.batch,
            steps=args.steps,
            device=device,
            threads=threads,
        )
    base = speed[0].get("tokens_per_sec")
    for r in speed:
        r["ratio_to_transformer"] = r["tokens_per_sec"] / base if base and "tokens_per_sec" in r else None
    hope = next(r for r in speed if r["row"] == "HOPE (learning)")
    ratio = hope.get("ratio_to_transformer")
    met = ratio is not None and ratio >= GOAL
    goal_line = f"Goal: HOPE (learning) >= {GOAL}x Transformer++ tokens/s: " + (
        f"{ratio:.3f}x, {'met' if met else 'NOT met'}." if ratio is not None else "not measured (a row failed)."
    )
    print(goal_line)

    lines = [
        f"## Speed: training step (forward + backward + AdamW) at d_model 256, 4 layers, B x T = {args.batch} x "
        f"{args.seq_len}, vocab {SPEED_VOCAB}, {'fp32' if cpu else 'bf16 autocast'} on {label}",
        "",
        "| model (tiny) | params | tokens/s | ratio to Transformer++ | ms/step (median) | ms min-max | "
        f"peak GiB ({'process RSS' if cpu else 'GPU alloc'}) | GFLOP/step | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in speed:
        if "error" in r:
            lines.append(f"| {r['row']} | - | error: {r['error']} | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r['row']} | {r['params']:,} | {r['tokens_per_sec']:,.0f} | {r['ratio_to_transformer']:.3f}x | "
            f"{r['step_ms_median']:.1f} | {r['step_ms_min']:.1f}-{r['step_ms_max']:.1f} | {r['peak_mem_gib']:.2f} | "
            f"{r['gflop_per_step']:.1f} | {r['gflop_per_sec']:.0f} |"
        )
    lines += ["", f"**{goal_line}**"]
    if versus:
        lines += [
            "",
            f"## This tree against revision {versus[0]['baseline']} (`--baseline`)",
            "",
            f"Each HOPE row timed {args.repeats} times on each tree, alternating, each time in a fresh process "
            f"({args.steps} timed steps after 1 warm-up); medians of those runs.",
            "",
            "| row | this tree tokens/s (runs) | baseline tokens/s (runs) | this / baseline | peak GiB this / "
            "baseline |",
            "|---|---|---|---|---|",
        ]
        for r in versus:
            runs = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)  # noqa: E731
            lines.append(
                f"| {r['row']} | {r['this_tokens_per_sec']:,.0f} ({runs(r['this_runs'])}) | "
                f"{r['baseline_tokens_per_sec']:,.0f} ({runs(r['baseline_runs'])}) | {r['ratio']:.3f}x | "
                f"{r['this_peak_gib']:.2f} / {r['baseline_peak_gib']:.2f} |"
            )
    if "gflop_per_step" in hope and "gflop_per_step" in speed[0]:
        bound = speed[0]["gflop_per_step"] / hope["gflop_per_step"]
        efficiency = hope["gflop_per_sec"] / speed[0]["gflop_per_sec"]
        flop_line = (
            f"FLOP bound: a HOPE (learning) step does {1 / bound:.2f}x Transformer++'s FLOPs, so at Transformer++'s "
            f"FLOP rate it would reach {bound:.3f}x its tokens/s; it runs at {efficiency:.2f}x that rate (its work is "
            "many small per-head matmuls and elementwise ops, against Transformer++'s few large GEMMs)."
        )
        print(flop_line)
        lines += ["", flop_line]

    # ---------------------------------------------------------------------------------------------- scale
    scale = []
    scale_layers = args.scale_layers or (2 if cpu else registry.get_spec("hope").presets[SCALE_PRESET]["n_layers"])
    scale_len = args.scale_seq_len or 4096
    scale_steps, scale_warmup = (args.scale_steps or 1, 0) if cpu else (args.scale_steps or 3, 1)
    if not args.skip_scale:
        for learning in (True, False):
            r = in_child(
                scale_row,
                learning,
                n_layers=scale_layers,
                seq_len=scale_len,
                steps=scale_steps,
                warmup=scale_warmup,
                device=device,
                threads=threads,
            )
            kind = "learning" if learning else "frozen"
            r = {"row": f"HOPE {SCALE_PRESET} widths, {scale_layers} layers ({kind})", "learning": learning, **r}
            if "error" in r:
                print(f"scale {kind:>8}: {r['error']}")
            else:
                print(
                    f"scale {kind:>8}: {r['tokens_per_sec']:>8,.1f} tokens/s  {r['step_ms_median']:9.1f} ms/step  "
                    f"{r['peak_mem_gib']:.2f} GiB  fast state {_gib(r['fast_state_bytes'])} vs dense copy "
                    f"{_gib(r['dense_copy_bytes'])}"
                )
            scale.append(r)
        ok = [r for r in scale if "error" not in r]
        lines += [
            "",
            f"## Scale: HOPE `{SCALE_PRESET}` widths (d_model 1024, 8 memory heads, CMS in-context chunk 512, window "
            f"4096), {scale_layers} layers, batch 1, T = {scale_len}, vocab {SCALE_VOCAB}: one forward + backward "
            f"(no optimizer), {'fp32' if cpu else 'bf16 autocast'}",
            "",
            "| model | params | tokens/s | ms/step | peak GiB | fast state at the end | of which dense deltas | "
            "one dense per-sequence copy of the in-context MLPs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in scale:
            if "error" in r:
                lines.append(f"| {r['row']} | - | error: {r['error']} | - | - | - | - | - |")
                continue
            lines.append(
                f"| {r['row']} | {r['params']:,} | {r['tokens_per_sec']:,.1f} | {r['step_ms_median']:,.0f} | "
                f"{r['peak_mem_gib']:.2f} | {_gib(r['fast_state_bytes'])} | {_gib(r['fast_state_dense_bytes'])} | "
                f"{_gib(r['dense_copy_bytes'])} |"
            )
        if len(ok) == 2 and ok[0]["learning"] and not ok[1]["learning"]:
            on, off = ok
            cost = (
                f"Test-time learning at this scale: {on['tokens_per_sec'] / off['tokens_per_sec']:.2f}x the frozen "
                f"model's tokens/s, {on['peak_mem_gib'] / off['peak_mem_gib']:.2f}x its peak memory "
                f"({on['peak_mem_gib'] - off['peak_mem_gib']:+.2f} GiB)."
            )
            lines += ["", cost]
            print(cost)

    note = (
        f"Each row ran in a fresh spawned process ({threads} threads on CPU), so its peak memory is its own: on CPU the "
        "process's peak resident set (torch, the model and its optimizer state included), on CUDA "
        "`torch.cuda.max_memory_allocated` over the timed steps. Speed rows: median of the timed steps after the warm-up "
        f"({args.steps} timed after 1 warm-up; Transformer++ {max(10, args.steps)} after 2). HOPE tiny: in-context CMS "
        "level at chunk 64 (the levels at 2048 and 8192 are persistent), self-modifying Titans chunks 16 / 64; "
        "'frozen' is `test_time_learning=False` (the in-context level keeps its initial weights). "
        f"Scale rows: {scale_steps} timed step(s) after {scale_warmup} warm-up; the fast state is the in-context CMS "
        "state (applied factors, dense deltas, open taps) after a no-grad read of the same window, at the last "
        "committed chunk boundary (the last chunk is learnt from only once the token after it is known); "
        "the dense copy is B x (w1 + w3 + w2) of every in-context level in the weights' dtype. "
        + (
            f"On CPU the scale rows keep the {SCALE_PRESET} widths but run {scale_layers} layers at T = {scale_len} "
            "instead of the preset's 20 layers at 4096, so that they finish in a few minutes (`--scale-layers`, "
            "`--scale-seq-len`). "
            if cpu
            else ""
        )
        + "The CPU is shared with other work, so CPU figures are noisy: read ratios within one run."
    )
    meta = {
        "threads": threads,
        "dtype": "float32" if cpu else "bfloat16 autocast",
        "goal": f"HOPE (learning) tokens/s >= {GOAL} x Transformer++ tokens/s (tiny, training step)",
        "goal_ratio": ratio,
        "goal_met": met,
        "speed": {"seq_len": args.seq_len, "batch": args.batch, "vocab": SPEED_VOCAB, "steps": args.steps},
        "baseline": None if args.baseline is None else _revision(args.baseline),
        "scale": None
        if args.skip_scale
        else {
            "preset": SCALE_PRESET,
            "n_layers": scale_layers,
            "seq_len": scale_len,
            "batch": 1,
            "vocab": SCALE_VOCAB,
            "steps": scale_steps,
            "warmup": scale_warmup,
        },
    }
    rows = [{"table": "speed", **r} for r in speed] + [{"table": "scale", **r} for r in scale]
    rows += [{"table": "baseline", **r} for r in versus]
    write_results("hope", label, meta, rows, lines, note)


if __name__ == "__main__":
    main()
