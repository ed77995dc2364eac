"""The op benchmarks: one module per op, each timing every contestant (our Triton kernel, our PyTorch reference,
the peers that import) under one protocol in the same run, and writing its own results files.

    python -m bench.ops [--ops delta_rule,titans_memory] [--dtype bf16|fp16|fp32] [--repeats N] [--warmup N]
                        [--out DIR] [each op's options: --shapes (delta rule), --memory-shapes (Titans memory)]

An op module has ``NAME``, ``add_arguments(parser)`` (its own options) and ``bench(args, run)``; ``main`` parses the
options they share into a ``common.Run`` and runs the ops asked for, in order. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from bench.common import DTYPES, RESULTS, Run, device_and_label

OPS = ("delta_rule", "titans_memory")


def parse_ops(text: str) -> list[str]:
    ops = [op.strip() for op in text.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise argparse.ArgumentTypeError(f"unknown ops {unknown}: choose from {', '.join(OPS)}")
    return ops


def main(argv: list[str] | None = None) -> int:
    modules = {op: importlib.import_module(f"bench.ops.{op}") for op in OPS}
    parser = argparse.ArgumentParser(
        prog="python -m bench.ops",
        description="Time the kernel ops (bench/ops/<op>.py) against their peers, every contestant in the same run.",
        epilog="Without a GPU only the PyTorch contestants run, in fp32, on the default shapes scaled down for a small "
        "CPU. bench/README.md says which ratio to read per op.",
    )
    parser.add_argument("--ops", type=parse_ops, default=list(OPS), help=f"comma-separated; default {','.join(OPS)}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure; 10 on CUDA, 5 on CPU")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before them; default 2")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    for module in modules.values():
        module.add_arguments(parser)
    args = parser.parse_args(argv)
    device, label = device_and_label()
    cuda = device == "cuda"
    run = Run(
        device=device,
        label=label,
        dtype=DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32),
        repeats=args.repeats if args.repeats is not None else (10 if cuda else 5),
        warmup=args.warmup,
        out=args.out,
    )
    if run.repeats < 1 or run.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if not cuda:
        print("no CUDA device: timing the PyTorch contestants only (Triton and fla need a GPU)")
    print(f"dtype {run.dtype_name}, {run.repeats} timed calls after {run.warmup} warm-up per figure")
    for op in args.ops:
        modules[op].bench(args, run)
    return 0
