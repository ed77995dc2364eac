"""One Titans-memory kernel call (forward, then backward) on a CUDA device, small enough to run under
``compute-sanitizer --tool memcheck``, which then names the kernel and source line of any illegal access.

    compute-sanitizer --tool memcheck --print-limit 3 python bench/gpu_memcheck.py --seq-len 256 --chunk 64 --head-dim 64

bench/gpu_check.sh runs it over the shapes that have crashed a GPU (bench/results/gpu-check-NVIDIA_H200.md).
``--op hope`` runs HOPE's main-memory rule (the same kernels with exact DGD and the residual target) instead.
"""

from __future__ import annotations

import argparse

import torch

from kernels.titans_memory import initial_memory_state, titans_memory


def _override_settings(**overrides) -> None:
    """Launch every kernel of this process with some settings replaced (those given as not None): isolates which
    setting a crash depends on."""
    overrides = {("PREC" if k == "prec" else k): v for k, v in overrides.items() if v is not None}
    if not overrides:
        return
    from kernels.titans_memory.autograd import LaunchShape

    settings = LaunchShape.settings
    LaunchShape.settings = lambda self, *a, **k: {**settings(self, *a, **k), **overrides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=["titans", "hope"], default="titans")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cuda", help="cpu: the Triton interpreter (set TRITON_INTERPRET=1)")
    parser.add_argument(
        "--prec", choices=["bf16", "fp16", "tf32", "ieee"], help="override how the kernels multiply tiles"
    )
    parser.add_argument("--num-warps", type=int, help="override the launch's warps")
    args = parser.parse_args()
    _override_settings(prec=args.prec, num_warps=args.num_warps)
    B, T, H, D = args.batch, args.seq_len, args.heads, args.head_dim
    dev, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    gates = [(torch.rand(B, T, H, device=dev) * s).requires_grad_() for s in (0.1, 1.0, 0.1)]
    dims = [D, 4 * D, D] if args.depth == 2 else [D, D]
    init = [(torch.randn(H, a, b, device=dev) * 0.05).requires_grad_() for a, b in zip(dims, dims[1:])]
    if args.op == "titans":
        state = initial_memory_state(init, B)
        y, _ = titans_memory(
            q, k, v, *gates, state, chunk_size=args.chunk, activation="gelu", max_grad_norm=1.0, backend="triton"
        )
    else:
        from kernels.self_modifying.autograd import triton_main_memory

        # heads first; inner rate eta and retention alpha per token, momentum decay beta per head; state [B, 1, H, ...]
        eta, keep = gates[0].transpose(1, 2), 1 - gates[2].transpose(1, 2)
        beta = torch.full((B, 1, H), 0.5, device=dev)
        w = [x.expand(B, 1, *x.shape) for x in init]
        y, *_ = triton_main_memory(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            eta,
            keep,
            beta,
            w,
            [torch.zeros_like(x) for x in w],
            chunk_size=args.chunk,
            dgd=True,
            activation="gelu",
            max_grad_norm=None,
            dot_dtype=dtype,
        )
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"{args.op} forward ok: {vars(args)}", flush=True)
    y.float().backward(torch.randn(y.shape, device=dev))
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"{args.op} backward ok: {vars(args)}", flush=True)


if __name__ == "__main__":
    main()
