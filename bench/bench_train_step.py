"""Training-step throughput of every registered family: forward + backward + AdamW step, tokens/s and peak memory.

    python bench/bench_train_step.py [--presets tiny] [--seq-len 256] [--batch 4] [--steps 10] [--vocab 257]

Writes bench/results/train_step-<device>.json and .md. On CUDA the step runs under bf16 autocast, on CPU in fp32
(what training uses on each).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nlplatform import registry

RESULTS = Path(__file__).resolve().parent / "results"


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def bench_one(name: str, preset: str, *, seq_len: int, batch: int, steps: int, vocab: int, device: str) -> dict:
    torch.manual_seed(0)
    cfg = registry.model_config(name, preset, vocab_size=vocab)
    model = registry.build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    x = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step() -> None:
        with autocast:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, kernels, autotuning
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "family": name,
        "preset": preset,
        "params": sum(p.numel() for p in model.parameters()),
        "seq_len": seq_len,
        "batch": batch,
        "step_ms_median": 1000 * median,
        "tokens_per_sec": batch * seq_len / median,
        # GPU: peak allocated by torch; CPU: peak resident set of the whole process (an upper bound).
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else _peak_rss_gib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)  # the peer benchmarks time 4 x 256 tokens
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=257)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    rows = []
    for name in registry.FAMILIES:
        for preset in args.presets:
            if preset not in registry.get_spec(name).presets:
                continue
            row = bench_one(
                name, preset, seq_len=args.seq_len, batch=args.batch, steps=args.steps, vocab=args.vocab, device=device
            )
            print(
                f"{name:>16} {preset:>6}: {row['tokens_per_sec']:>10,.0f} tokens/s  {row['step_ms_median']:8.1f} ms/step"
            )
            rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    tag = device_name.replace(" ", "_")
    meta = {"device": device_name, "torch": torch.__version__, "platform": platform.platform()}
    (RESULTS / f"train_step-{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "| family | preset | params | seq_len x batch | ms/step | tokens/s | peak GiB (GPU alloc / CPU RSS) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = f"{r['peak_mem_gib']:.2f}"
        lines.append(
            f"| {r['family']} | {r['preset']} | {r['params']:,} | {r['seq_len']}x{r['batch']} | "
            f"{r['step_ms_median']:.1f} | {r['tokens_per_sec']:,.0f} | {mem} |"
        )
    (RESULTS / f"train_step-{tag}.md").write_text(
        f"Device: {device_name}, torch {torch.__version__}\n\n" + "\n".join(lines) + "\n"
    )
    print(f"results: {RESULTS / f'train_step-{tag}.json'}")


if __name__ == "__main__":
    main()
