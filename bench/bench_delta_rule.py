"""Delta-rule op throughput: forward + backward of the pure-PyTorch (gated) delta rule, tokens/s and peak memory.

    python bench/bench_delta_rule.py [--batch 4] [--seq-len 256] [--heads 4] [--head-dim 64] [--iters 10]
                                     [--recurrent-iters 5] [--chunk-sizes 16 32 64 128]

Times the op alone in fp32: the chunked form with decay (Gated DeltaNet) at each chunk size, the chunked form without
decay (plain DeltaNet) at chunk 64, and the step-by-step recurrence with decay. Writes
bench/results/delta_rule-<device>.json and .md. On CPU with 2 threads, at the default shape, each row is also set
against the flash-linear-attention 0.6.0 naive references timed on the same machine type (PEER below).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import device_and_label, median_seconds, peak_mem_gib, write_results

from kernels.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule

# The project's peer benchmark: flash-linear-attention 0.6.0's pure-PyTorch references, forward + backward, fp32,
# B=4, T=256, H=4, D=64, on this machine type's CPU with 2 threads.
PEER = {
    "source": "flash-linear-attention 0.6.0 naive references, same shape, fp32, 2 threads (the project's peer benchmark)",
    "device": "cpu-2threads",
    "shape": {"batch": 4, "seq_len": 256, "heads": 4, "head_dim": 64},
    "chunk": {"name": "naive_chunk_gated_delta_rule", "chunk_size": 64, "tokens_per_sec": 25_492},
    "recurrent": {"name": "naive_recurrent_gated_delta_rule", "tokens_per_sec": 5_776},
}


def bench_one(
    form: str, chunk_size: int | None, gated: bool, *, batch: int, seq_len: int, heads: int, head_dim: int,
    iters: int, device: str,
) -> dict:  # fmt: skip
    torch.manual_seed(0)
    B, T, H, D = batch, seq_len, heads, head_dim
    q = F.normalize(torch.randn(B, T, H, D, device=device), p=2, dim=-1).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, D, device=device), p=2, dim=-1).requires_grad_()
    v = torch.randn(B, T, H, D, device=device).requires_grad_()
    beta = torch.rand(B, T, H, device=device).sigmoid().requires_grad_()
    g = F.logsigmoid(torch.randn(B, T, H, device=device)).requires_grad_() if gated else None
    do = torch.randn(B, T, H, D, device=device)
    leaves = [x for x in (q, k, v, beta, g) if x is not None]
    scale = D**-0.5

    def step() -> None:
        for x in leaves:
            x.grad = None
        if form == "chunk":
            o, _ = chunk_gated_delta_rule(q, k, v, beta, g, scale=scale, chunk_size=chunk_size)
        else:
            o, _ = recurrent_gated_delta_rule(q, k, v, beta, g, scale=scale)
        (o * do).sum().backward()

    median = median_seconds(step, iters, device)
    return {
        "name": f"{form}_gated_delta_rule" if gated else f"{form}_delta_rule",
        "chunk_size": chunk_size,
        "gated": gated,
        "shape": [B, T, H, D],
        "iters": iters,
        "ms_median": 1000 * median,
        "tokens_per_sec": B * T / median,
        "peak_mem_gib": peak_mem_gib(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)  # the peer benchmark times B=4, T=256, H=4, D=64
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--recurrent-iters", type=int, default=5)  # the recurrence is O(T) sequential steps
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    args = parser.parse_args()
    device, device_name = device_and_label()
    shape = {"batch": args.batch, "seq_len": args.seq_len, "heads": args.heads, "head_dim": args.head_dim}
    # A peer figure only means something on the machine and shape it was measured at.
    peer_applies = device_name == PEER["device"] and shape == PEER["shape"]

    cases = [("chunk", c, True, args.iters) for c in args.chunk_sizes]
    cases += [("chunk", 64, False, args.iters), ("recurrent", None, True, args.recurrent_iters)]
    rows = []
    for form, chunk_size, gated, iters in cases:
        row = bench_one(form, chunk_size, gated, **shape, iters=iters, device=device)
        peer = None
        if peer_applies and gated:
            peer = PEER["chunk" if form == "chunk" else "recurrent"]["tokens_per_sec"]
        row["peer_tokens_per_sec"] = peer
        row["ratio_to_peer"] = row["tokens_per_sec"] / peer if peer else None
        ratio = f"  {row['ratio_to_peer']:.2f}x peer" if peer else ""
        print(
            f"{row['name']:>26} chunk={chunk_size!s:>4}: {row['tokens_per_sec']:>10,.0f} tokens/s  "
            f"{row['ms_median']:8.1f} ms/iter{ratio}"
        )
        rows.append(row)

    meta = {
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "timed": "forward + backward of the op alone, median of the timed iterations after 2 warm-up iterations",
        "peer": PEER,
        "peer_applies": peer_applies,
    }
    lines = [
        "| op | chunk | gated | B x T x H x D | ms/iter | tokens/s | peer tokens/s | ratio to peer | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peer = f"{r['peer_tokens_per_sec']:,}" if r["peer_tokens_per_sec"] else "-"
        ratio = f"{r['ratio_to_peer']:.2f}x" if r["ratio_to_peer"] else "-"
        lines.append(
            f"| {r['name']} | {r['chunk_size'] or '-'} | {'yes' if r['gated'] else 'no'} | "
            f"{'x'.join(map(str, r['shape']))} | {r['ms_median']:.1f} | {r['tokens_per_sec']:,.0f} | {peer} | "
            f"{ratio} | {r['peak_mem_gib']:.2f} |"
        )
    if peer_applies:
        note = (
            f"Forward + backward of the op alone, fp32. Peer: {PEER['source']}; the chunked rows with decay are "
            f"compared with {PEER['chunk']['name']} (chunk 64, {PEER['chunk']['tokens_per_sec']:,} tokens/s) and "
            f"the recurrent row with {PEER['recurrent']['name']} ({PEER['recurrent']['tokens_per_sec']:,} tokens/s)."
        )
    else:
        note = f"Forward + backward of the op alone, fp32. No peer figure for this device or shape ({PEER['source']})."
    mem = "Peak GiB is torch's peak allocation." if device == "cuda" else "Peak GiB is the process's running RSS peak."
    write_results("delta_rule", device_name, meta, rows, lines, f"{note} {mem}")


if __name__ == "__main__":
    main()
