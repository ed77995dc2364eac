"""Training-step throughput of every registered family: forward + backward + AdamW step, tokens/s and peak memory.

    python bench/bench_train_step.py [--presets tiny] [--seq-len 256] [--batch 4] [--steps 10] [--vocab 257]

Writes bench/results/train_step-<device>.json and .md. On CUDA the step runs under bf16 autocast, on CPU in fp32
(what training uses on each).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import device_and_label, median_seconds, peak_mem_gib, write_results

from nlplatform import registry


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

    median = median_seconds(step, steps, device)
    return {
        "family": name,
        "preset": preset,
        "params": sum(p.numel() for p in model.parameters()),
        "seq_len": seq_len,
        "batch": batch,
        "step_ms_median": 1000 * median,
        "tokens_per_sec": batch * seq_len / median,
        # GPU: peak allocated by torch; CPU: peak resident set of the whole process (an upper bound).
        "peak_mem_gib": peak_mem_gib(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)  # the peer benchmarks time 4 x 256 tokens
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=257)
    args = parser.parse_args()
    device, device_name = device_and_label()
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
    lines = [
        "| family | preset | params | seq_len x batch | ms/step | tokens/s | peak GiB (GPU alloc / CPU RSS) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['preset']} | {r['params']:,} | {r['seq_len']}x{r['batch']} | "
            f"{r['step_ms_median']:.1f} | {r['tokens_per_sec']:,.0f} | {r['peak_mem_gib']:.2f} |"
        )
    write_results("train_step", device_name, {}, rows, lines)


if __name__ == "__main__":
    main()
