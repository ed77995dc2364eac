"""Build every Triton kernel (delta rule, Titans memory) for an H100 (sm_90) without a GPU, and report its resources.

    python -m kernels.tools.build [--quick] [--out DIR]

Triton compiles ahead of time for a named target with its bundled ptxas, so this checks that the kernels lower to
GPU code (the CPU interpreter does not) and reads, per kernel, the registers per thread, the bytes spilled to the
stack and the shared memory, at the launch settings the host functions use (tiles from ``kernels/delta_rule/tiling``
and ``kernels.titans_memory.autograd.LaunchShape``). Registers at 255 with a stack means spills: the first thing to
look at when a kernel is slow. Shared memory above 227 KiB (232448 bytes) would not launch on an H100. Writes
bench/results/kernel-build-sm90-triton<major.minor>.json and .md (``--out`` another folder): the figures are the
compiler's, so each Triton version gets its own file (run it from a venv with the GPU machines' Triton to see what
they will build); ``--quick`` builds one variant of each op and writes nothing (for the tests). Needs only torch and
triton. Must run without TRITON_INTERPRET (the interpreter replaces the compiler); it refuses otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# The kernel modules below are decorated at import time: under the interpreter they would not compile.
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernels.tools.build: unset TRITON_INTERPRET (the interpreter cannot build GPU code)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.delta_rule.chunk_h import (  # noqa: E402
    chunk_gated_delta_rule_bwd_dhu_kernel,
    chunk_gated_delta_rule_fwd_h_kernel,
)
from kernels.delta_rule.chunk_o import chunk_bwd_dqkwg_kernel, chunk_fwd_o_kernel  # noqa: E402
from kernels.delta_rule.tiling import block, num_warps, state_block  # noqa: E402
from kernels.delta_rule.wy_fast import prepare_wy_repr_bwd_kernel, prepare_wy_repr_fwd_kernel  # noqa: E402
from kernels.titans_memory.autograd import LaunchShape  # noqa: E402
from kernels.titans_memory.chunk_kernels import titans_memory_bwd_kernel, titans_memory_fwd_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# pointer arguments that are float32 whatever the input dtype (gates, their cumsum, T, gradients kept in fp32)
FP32 = {"beta", "g", "gc", "A", "h0", "ht", "dht", "dh0", "dq", "dk", "dw", "dbeta", "dgc", "dg"}
SCALARS = {"T": "i32", "NC": "i32", "N0": "i32", "NCH": "i32", "SLOTS": "i32", "scale": "fp32", "max_grad_norm": "fp32"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the Titans memory kernels' pointers in the input dtype; every other pointer (gate coefficients, states, scratch,
# gradients other than dy) is float32
TITANS_INPUT_DTYPE = {"q", "k", "v", "y", "dy"}


def launches(BT: int, K: int, V: int, gated: bool, state: bool) -> list[tuple]:
    """(kernel, constexprs, num_warps, num_stages, fp32 pointer args, None args) as the host functions launch them."""
    common = {"H": 16, "K": K, "V": V, "BT": BT, "USE_G": gated, "DOT_PRECISION": "ieee"}
    chunk = {**common, "BK": block(K, 64), "BV": block(V, 64)}
    seq = {**common, "BK": state_block(K), "BV": block(V, 32)}
    none_g = set() if gated else {"g", "gc", "dgc", "dg"}
    none_state = set() if state else {"h0", "ht", "dht", "dh0"}
    w = num_warps(BT)
    return [
        (prepare_wy_repr_fwd_kernel, chunk, w, 3, set(), none_g),
        (
            chunk_gated_delta_rule_fwd_h_kernel,
            {**seq, "USE_INITIAL_STATE": state, "STORE_FINAL_STATE": state},
            w,
            1,
            set(),
            none_g | none_state,
        ),
        (chunk_fwd_o_kernel, chunk, w, 3, set(), none_g),
        (
            chunk_gated_delta_rule_bwd_dhu_kernel,
            {**seq, "USE_INITIAL_STATE": state, "USE_FINAL_STATE_GRADIENT": state},
            w,
            2,
            set(),
            none_g | none_state,
        ),
        (chunk_bwd_dqkwg_kernel, chunk, w, 3, set(), none_g),
        (prepare_wy_repr_bwd_kernel, chunk, w, 3, {"dv"}, none_g),
    ]


def titans_launches(dtype: str, chunk: int, K: int, hidden: int | None, hope: bool = False) -> list[tuple]:
    """The Titans memory kernels as ``kernels.titans_memory.autograd`` launches them (H = 8, K = V, clipping on, gelu;
    ``hidden=None`` is a depth-1 memory; ``hope``: HOPE's main memory, residual self-generated target and exact DGD,
    whose op hands the kernels float32 tensors and multiplies as ``dtype``, the model's dtype)."""
    q = torch.empty(1, 4096, 8, K, device="meta")
    shape = LaunchShape(q, q, 1 if hidden is None else 2, hidden or K, chunk)
    settings = shape.settings("gelu", 1.0, TORCH_DTYPES[dtype], residual=hope, dgd=hope)
    warps, stages = settings.pop("num_warps"), settings.pop("num_stages")
    fp32 = lambda kernel: set(kernel.arg_names) - (set() if hope else TITANS_INPUT_DTYPE)  # noqa: E731
    return [
        (titans_memory_fwd_kernel, {**settings, "STORE_Y": True}, warps, stages, fp32(titans_memory_fwd_kernel), set()),
        (titans_memory_bwd_kernel, settings, warps, stages, fp32(titans_memory_bwd_kernel), set()),
    ]


def build(kernel, constexprs: dict, warps: int, stages: int, fp32_extra: set, none: set, dtype: str) -> dict:
    names = kernel.arg_names
    signature, consts = {}, dict(constexprs)
    for name in names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in none:
            signature[name], consts[name] = "constexpr", None
        elif name in SCALARS:
            signature[name] = SCALARS[name]
        else:
            signature[name] = "*fp32" if name in FP32 | fp32_extra else f"*{dtype}"
    source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(source, target=TARGET, options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True)
    usage = re.search(r"REG:(\d+) STACK:(\d+)", report.stdout)
    return {
        "kernel": kernel.__name__,
        "num_warps": warps,
        "num_stages": stages,
        "registers": int(usage.group(1)) if usage else None,
        "spill_bytes": int(usage.group(2)) if usage else None,
        "shared_bytes": compiled.metadata.shared,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one variant of each op (bf16, the 340m shapes); no files")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default, set to silence its warning
    # delta rule: (op, dtype, chunk, K = V, gated, initial and final state)
    variants = [("delta_rule", "bf16", 64, 128, True, True)]
    # dtype, chunk, K = V, hidden (None: depth 1), HOPE's main memory: the 340m Titans and HOPE memories first
    memory = [("bf16", 64, 128, 512, False), ("bf16", 16, 128, 128, True)]
    if not args.quick:
        variants += [
            ("delta_rule", "bf16", 64, 128, False, False),
            ("delta_rule", "bf16", 64, 64, True, True),
            ("delta_rule", "bf16", 32, 128, True, True),
            ("delta_rule", "fp16", 64, 128, True, True),
            ("delta_rule", "fp32", 64, 128, True, True),
        ]
        memory += [
            ("bf16", 16, 128, 512, False),
            ("bf16", 64, 64, 256, False),
            ("bf16", 64, 128, None, False),
            ("fp16", 64, 128, 512, False),
            ("fp32", 32, 128, 512, False),
            ("fp32", 64, 64, 256, False),
            ("fp32", 16, 128, 128, True),
            ("bf16", 16, 128, None, True),
        ]
    jobs = []
    for _, dtype, BT, D, gated, state in variants:
        variant = ("gated" if gated else "ungated") + (" + state" if state else "")
        jobs += [("delta_rule", dtype, BT, f"K=V={D}", variant, launch) for launch in launches(BT, D, D, gated, state)]
    for dtype, chunk, K, hidden, hope in memory:
        widths = f"K=V={K}" + (f" D={hidden}" if hidden else "")
        variant = ("depth 1" if hidden is None else "depth 2") + (", HOPE main memory" if hope else "")
        jobs += [
            ("titans_memory", dtype, chunk, widths, variant, launch)
            for launch in titans_launches(dtype, chunk, K, hidden, hope)
        ]
    rows = []
    for op, dtype, chunk, widths, variant, (kernel, constexprs, warps, stages, fp32_extra, none) in jobs:
        row = build(kernel, constexprs, warps, stages, fp32_extra, none, dtype)
        row.update(op=op, dtype=dtype, chunk_size=chunk, widths=widths, variant=variant)
        rows.append(row)
        print(
            f"{dtype} C={chunk} {widths} {variant} {row['kernel']:40s} warps={warps} stages={stages} "
            f"regs={row['registers']} spill={row['spill_bytes']} B shared={row['shared_bytes']} B"
        )
    if args.quick:
        return
    lines = [
        "| op | dtype | chunk | widths | variant | kernel | warps | stages | registers | spill bytes | shared bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['chunk_size']} | {r['widths']} | {r['variant']} | {r['kernel']} | "
            f"{r['num_warps']} | {r['num_stages']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} |"
        )
    note = (
        f"Built with triton {triton.__version__} for sm_90 without a GPU (ptxas from the triton wheel). Delta rule: "
        "H = 16, K = V. Titans memory: H = 8, gelu, clipping on; D is the hidden width of a depth-2 memory; the HOPE "
        "rows add the residual self-generated target and exact DGD (a triangular solve per chunk and layer); HOPE's "
        "op hands the kernels float32 tensors, so there the dtype is the model's, which sets how the tiles are "
        "multiplied. Registers per thread (255 is the ceiling), stack bytes spilled per thread, shared memory per "
        "program (an H100 launches at most 232448 bytes). The fp32 rows use IEEE products, i.e. FMA loops rather than tensor cores: ptxas "
        "builds the largest of them at 32 registers with a deep stack (its own choice, no register cap is set), so "
        "fp32 inputs are the exact path, not the fast one; training runs bf16."
    )
    version = ".".join(triton.__version__.split(".")[:2])
    write_results(args.out, f"sm90-triton{version}", rows, lines, note)


def write_results(folder: Path, label: str, rows: list[dict], lines: list[str], note: str) -> None:
    """``kernel-build-<label>.json`` and ``.md`` in the layout of the benchmarks' results (bench/common.py, which
    this package does not import: kernels/ needs only torch and triton)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"device": label, "torch": torch.__version__, "platform": platform.platform()}
    meta |= {"triton": triton.__version__, "target": "cuda sm_90"}
    path = folder / f"kernel-build-{label}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = "\n".join(lines)
    path.with_suffix(".md").write_text(f"Device: {label}, torch {torch.__version__}\n\n{table}\n\n{note}\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
