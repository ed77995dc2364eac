"""Titans memory training step against titans-pytorch's NeuralMemory: forward + backward + AdamW, tokens/s, fp32.

    python bench/bench_titans_memory.py [--chunks 4 16 64 256] [--peer-chunks 4 16 64] [--iters 6] [--quick]
                                        [--slow-iters 1] [--no-peer] [--mem-cap-gib G]

What is compared. Both contestants are a memory module of dim 256 with one head and a depth-2 MLP memory of
expansion 4 (256 -> 1024 -> 256, GELU), trained for one step on x, target = randn(4, 256, 256) with an mse loss and
AdamW (lr 3e-4); tokens/s = B * T / the median step time. This is the project's peer protocol
(the protocol of the reference peer timings, "peerbench", taken on this machine type): a fresh module per chunk size from torch.manual_seed(0),
2 warm-up steps, then the median of ``--iters`` (6) timed steps, each ``zero_grad(set_to_none=True)``, forward, mse,
``backward``, ``step``.

- ours: ``TitansMemoryModule`` below. RMSNorm, linear q, k, v (256 -> 256, no bias), q and k L2-normalised, per-token
  theta = 0.1 sigmoid, eta = sigmoid, alpha = sigmoid from linear layers, learnable initial memory weights
  [1, 256, 1024] and [1, 1024, 256], ``kernels.titans_memory.titans_memory`` (the chunkwise reference backend), an
  output projection (256 -> 256).
- peer: titans-pytorch 0.5.5 ``NeuralMemory(dim=256, chunk_size=c)`` with its defaults, timed as peerbench does.
  It is not a project dependency; install it beside the project to re-measure it (see bench/README.md). Without it
  the peer rows are skipped and the ratios use the peerbench figures, labelled as such.

How to read it. Compare rows at the same chunk size; the column to read is **ratio ours/peer** (ours tokens/s /
peer tokens/s), and the speed goal is >= 5x at chunk 16. The chunk size means the same thing on both sides (the
tokens whose memory gradients are taken at the same weights), but the work per chunk is not identical: every token
of ours reads the memory updated up to and including itself, with momentum and forgetting per token, whereas the
peer reads the memory as of the previous chunk boundary and pools momentum and forgetting per chunk; the peer's
memory also wraps the MLP in a LayerNorm + residual. Ours does at least the peer's work per chunk, so the ratio does
not flatter it. Chunk 1 is the exact online rule: ours keeps every token's memory weights for the backward (well
over 10 GiB at this shape), so it runs only when asked for (``--chunks 1 ...``), under an address-space cap
(``--mem-cap-gib``), and running out of memory becomes an error row.

Every row runs in a fresh child process, so peak GiB (the child's peak resident set) belongs to that row alone.
The CPU is shared with other work: figures are noisy, and a ratio is best read from rows of one run. Writes
bench/results/titans_memory-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
import torch.nn.functional as F
from common import device_and_label, median_seconds, peak_mem_gib, write_results
from torch import nn

from kernels.titans_memory import initial_memory_state, titans_memory

DIM, BATCH, SEQ_LEN, EXPANSION, LR = 256, 4, 256, 4, 3e-4
PEER_VERSION = "0.5.5"

# The reference peer timings ("peerbench"), taken on this machine type with the same protocol:
# bench_titans_nm.py, titans-pytorch 0.5.5 NeuralMemory(dim=256, chunk_size=c), B=4, T=256, fp32, 2 threads.
PEER = {
    "source": "peerbench: titans-pytorch 0.5.5 NeuralMemory(dim=256), "
    "fwd + bwd + AdamW, B=4, T=256, fp32, 2 threads, median of 6 steps after 2 warm-up",
    "device": "cpu-2threads",
    "params": "1.25M",
    "tokens_per_sec": {64: 2_838, 16: 307, 4: 45},
}


class TitansMemoryModule(nn.Module):
    """The work of NeuralMemory(dim, heads=1) with our op: projections, gates, learnable initial memory, read-out."""

    def __init__(self, dim: int = DIM, heads: int = 1, expansion: int = EXPANSION, chunk_size: int = 16):
        super().__init__()
        assert dim % heads == 0
        self.heads, self.head_dim, self.chunk_size = heads, dim // heads, chunk_size
        self.norm = nn.RMSNorm(dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_theta, self.to_eta, self.to_alpha = (nn.Linear(dim, heads) for _ in range(3))
        d, hidden = self.head_dim, expansion * self.head_dim
        self.init_weights = nn.ParameterList(
            nn.Parameter(nn.init.xavier_uniform_(torch.empty(heads, d_in, d_out)))
            for d_in, d_out in ((d, hidden), (hidden, d))
        )
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).view(B, T, self.heads, self.head_dim) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        theta = 0.1 * torch.sigmoid(self.to_theta(h))
        eta, alpha = torch.sigmoid(self.to_eta(h)), torch.sigmoid(self.to_alpha(h))
        state = initial_memory_state(tuple(self.init_weights), B)
        y, _ = titans_memory(q, k, v, theta, eta, alpha, state, chunk_size=self.chunk_size)
        return self.to_out(y.reshape(B, T, -1))


def n_params(model: nn.Module) -> int:
    """Distinct parameters, counted as peerbench's benchlib does (NeuralMemory's include its unused template MLP)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _child_init(threads: int, cap_gib: float | None) -> None:
    torch.set_num_threads(threads)
    if cap_gib:
        cap = int(cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def bench_one(contestant: str, chunk_size: int, *, iters: int, warmup: int, device: str) -> dict:
    """One row, in a child process: build the module, time its training step, read the child's peak memory."""
    torch.manual_seed(0)
    if contestant == "ours":
        model = TitansMemoryModule(chunk_size=chunk_size).to(device)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return model(x)
    else:
        from titans_pytorch import NeuralMemory

        model = NeuralMemory(dim=DIM, chunk_size=chunk_size).to(device)

        def forward(x: torch.Tensor) -> torch.Tensor:
            out, _state = model(x)
            return out

    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    x, target = torch.randn(BATCH, SEQ_LEN, DIM, device=device), torch.randn(BATCH, SEQ_LEN, DIM, device=device)

    times = []  # every call's own duration, warm-up included, for the min and max beside the median

    def step() -> None:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.mse_loss(forward(x), target).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    median = median_seconds(step, iters, device, warmup=warmup)
    timed = times[warmup:]
    return {
        "contestant": contestant,
        "chunk_size": chunk_size,
        "params": n_params(model),
        "iters": iters,
        "warmup": warmup,
        "ms_median": 1000 * median,
        "tokens_per_sec": BATCH * SEQ_LEN / median,
        "ms_min": 1000 * min(timed),
        "ms_max": 1000 * max(timed),
        "tokens_per_sec_best": BATCH * SEQ_LEN / min(timed),
        "peak_mem_gib": peak_mem_gib(device),
    }


def run_row(contestant: str, chunk_size: int, *, threads: int, cap_gib: float | None, **kw) -> dict:
    """``bench_one`` in a fresh spawned process; an exception or a killed child becomes an error row."""
    ctx = get_context("spawn")
    try:
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=_child_init, initargs=(threads, cap_gib)) as pool:
            return pool.submit(bench_one, contestant, chunk_size, **kw).result()
    except Exception as exc:  # out of memory under the cap, a crash in the peer, a killed child
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if "can't allocate memory" in msg:
            msg = f"out of memory under the {cap_gib} GiB address-space cap"
        return {"contestant": contestant, "chunk_size": chunk_size, "error": msg[:300]}


def peer_availability() -> tuple[bool, str]:
    try:
        import titans_pytorch  # noqa: F401
    except Exception as exc:
        return False, f"titans_pytorch not importable ({type(exc).__name__}: {exc})"
    version = importlib.metadata.version("titans-pytorch")
    note = "" if version == PEER_VERSION else f" (the goal is stated against {PEER_VERSION})"
    return True, f"titans-pytorch {version}{note}"


def default_cap_gib() -> float:
    """An address-space cap per row: 60% of the memory available now, at most 16 GiB."""
    with open("/proc/meminfo") as f:
        avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    return round(min(16.0, 0.6 * avail_kib / 2**20), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[4, 16, 64, 256], help="ours (add 1 for the online rule)"
    )
    parser.add_argument("--peer-chunks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--iters", type=int, default=6)  # peerbench times 6 steps after 2 warm-up steps
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--slow-iters", type=int, default=1, help="timed steps of peer rows at chunk <= 4 (~20 s each)")
    parser.add_argument("--quick", action="store_true", help="skip chunk 4 and 256 (both contestants)")
    parser.add_argument("--no-peer", action="store_true", help="do not time titans-pytorch, use peerbench's figures")
    parser.add_argument("--mem-cap-gib", type=float, default=None, help="address-space cap per row (default: auto)")
    args = parser.parse_args()
    device, label = device_and_label()
    threads = torch.get_num_threads()
    cap_gib = args.mem_cap_gib if args.mem_cap_gib is not None else (default_cap_gib() if device == "cpu" else None)
    chunks, peer_chunks = args.chunks, args.peer_chunks
    if args.quick:
        chunks = [c for c in chunks if c not in (4, 256)]
        peer_chunks = [c for c in peer_chunks if c != 4]

    peer_ok, peer_status = peer_availability() if not args.no_peer else (False, "not run (--no-peer)")
    # The peerbench figures were taken on this machine type's CPU with 2 threads, in fp32.
    figures_apply = label == PEER["device"]
    print(f"device {label}, peer: {peer_status}, address-space cap per row: {cap_gib} GiB")

    rows = []
    # Ours and the peer alternate chunk size by chunk size, so that each pair sees much the same load on the machine.
    cases = []
    for c in sorted(set(chunks) | (set(peer_chunks) if peer_ok else set())):
        cases += [("ours", c)] * (c in chunks) + [("titans_pytorch", c)] * (peer_ok and c in peer_chunks)
    for contestant, c in cases:
        slow = contestant == "titans_pytorch" and c <= 4
        iters, warmup = (args.slow_iters, 1) if slow else (args.iters, args.warmup)
        row = run_row(contestant, c, threads=threads, cap_gib=cap_gib, iters=iters, warmup=warmup, device=device)
        if "error" in row:
            print(f"{contestant:>15} chunk={c:>4}: {row['error']}")
        else:
            print(
                f"{contestant:>15} chunk={c:>4}: {row['tokens_per_sec']:>8,.0f} tokens/s  {row['ms_median']:9.1f} ms/step"
                f" (min {row['ms_min']:.1f}, max {row['ms_max']:.1f})  {row['peak_mem_gib']:5.2f} GiB"
                f"  ({iters} timed after {warmup} warm-up)"
            )
        rows.append(row)

    # The peer figure for each of our rows: re-measured here when the peer ran, else peerbench's (same machine type).
    measured = {r["chunk_size"]: r for r in rows if r["contestant"] == "titans_pytorch" and "error" not in r}
    for r in rows:
        if r["contestant"] != "ours" or "error" in r:
            continue
        c = r["chunk_size"]
        r["ratio_to_peer_best"] = None
        if c in measured:
            r["peer_tokens_per_sec"], r["peer_source"] = measured[c]["tokens_per_sec"], "measured in this run"
            r["ratio_to_peer_best"] = r["tokens_per_sec_best"] / measured[c]["tokens_per_sec_best"]
        elif figures_apply and c in PEER["tokens_per_sec"]:
            r["peer_tokens_per_sec"] = PEER["tokens_per_sec"][c]
            r["peer_source"] = "peer figure from peerbench, not re-measured"
        else:
            r["peer_tokens_per_sec"], r["peer_source"] = None, None
        r["ratio_to_peer"] = r["tokens_per_sec"] / r["peer_tokens_per_sec"] if r["peer_tokens_per_sec"] else None
        if figures_apply and c in PEER["tokens_per_sec"]:
            r["peerbench_tokens_per_sec"] = PEER["tokens_per_sec"][c]
            r["ratio_to_peerbench"] = r["tokens_per_sec"] / PEER["tokens_per_sec"][c]

    lines = [
        "| contestant | chunk | params | ms/step | ms min-max | tokens/s | peak GiB | peer tokens/s | "
        "ratio ours/peer | ratio, fastest steps | ratio ours/peerbench |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "ours" if r["contestant"] == "ours" else "titans-pytorch NeuralMemory"
        if "error" in r:
            lines.append(f"| {name} | {r['chunk_size']} | - | - | - | error: {r['error']} | - | - | - | - | - |")
            continue
        peer, ratio, ratio_best, ratio_pb = "-", "-", "-", "-"
        if r.get("peer_tokens_per_sec"):
            mark = "" if r["peer_source"] == "measured in this run" else " (peerbench)"
            peer, ratio = f"{r['peer_tokens_per_sec']:,.0f}{mark}", f"{r['ratio_to_peer']:.2f}x"
        if r.get("ratio_to_peer_best"):
            ratio_best = f"{r['ratio_to_peer_best']:.2f}x"
        if r.get("ratio_to_peerbench"):
            ratio_pb = f"{r['ratio_to_peerbench']:.2f}x"
        lines.append(
            f"| {name} | {r['chunk_size']} | {r['params']:,} | {r['ms_median']:.1f} | "
            f"{r['ms_min']:.1f}-{r['ms_max']:.1f} | {r['tokens_per_sec']:,.0f} | {r['peak_mem_gib']:.2f} | {peer} | "
            f"{ratio} | {ratio_best} | {ratio_pb} |"
        )
    print("\n".join(lines))

    goal = next(
        (r for r in rows if r["contestant"] == "ours" and r["chunk_size"] == 16 and r.get("ratio_to_peer")), None
    )
    goal_line = (
        f"Goal (ours >= 5x titans-pytorch {PEER_VERSION} at chunk 16): {goal['ratio_to_peer']:.2f}x against "
        f"{goal['peer_tokens_per_sec']:,.0f} tokens/s ({goal['peer_source']}): {'met' if goal['ratio_to_peer'] >= 5 else 'not met'}."
        if goal
        else "Goal (ours >= 5x the peer at chunk 16): no chunk-16 pair in this run."
    )
    print(goal_line)
    note = (
        f"Forward + backward + AdamW step of a dim-{DIM}, one-head memory module with a depth-2, expansion-{EXPANSION} "
        f"MLP memory, B={BATCH}, T={SEQ_LEN}, fp32, {threads} threads; median of the timed steps after the warm-up "
        f"(peer rows at chunk <= 4: 1 warm-up, --slow-iters timed). Peer: {peer_status}. "
        f"'ratio ours/peer' is against the peer at the same chunk size, measured in this run where it ran, else the "
        f"peer figure from peerbench, not re-measured (marked); 'ratio, fastest steps' sets the fastest timed step of each against the other's (the least disturbed "
        f"by other work on the CPU); 'ratio ours/peerbench' is always against "
        f"{PEER['source']}. Each row ran in a fresh process; peak GiB is that process's peak resident set. The CPU "
        f"is shared with other work, so the figures are noisy. {goal_line}"
    )
    meta = {
        "threads": threads,
        "dtype": "float32",
        "shape": {"batch": BATCH, "seq_len": SEQ_LEN, "dim": DIM, "heads": 1, "memory": f"MLP depth 2 x{EXPANSION}"},
        "timed": "zero_grad + forward + mse + backward + AdamW step, median of timed steps after warm-up",
        "iters": args.iters,
        "warmup": args.warmup,
        "slow_iters": args.slow_iters,
        "peer_status": peer_status,
        "peer_measured": peer_ok,
        "peerbench": {**PEER, "applies": figures_apply},
        "mem_cap_gib": cap_gib,
        "goal": goal_line,
    }
    write_results("titans_memory", label, meta, rows, lines, note)


if __name__ == "__main__":
    main()
