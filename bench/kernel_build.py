"""Build every delta-rule Triton kernel for an H100 (sm_90) on a machine without a GPU, and report its resources.

    python bench/kernel_build.py [--quick]

Triton compiles ahead of time for a named target with its bundled ptxas, so this checks that the kernels lower to
GPU code (the CPU interpreter does not) and reads, per kernel, the registers per thread, the bytes spilled to the
stack and the shared memory, at the launch settings the host functions use (tiles from ``kernels/delta_rule/tiling``).
Registers at 255 with a stack means spills: the first thing to look at when a kernel is slow. Writes
bench/results/kernel-build-sm90.json and .md; ``--quick`` builds one variant and writes nothing (for the tests).
Must run without TRITON_INTERPRET (the interpreter replaces the compiler); the script refuses otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_build.py: unset TRITON_INTERPRET (the interpreter cannot build GPU code)")

import triton  # noqa: E402
from common import write_results  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.delta_rule.chunk_h import (  # noqa: E402
    chunk_gated_delta_rule_bwd_dhu_kernel,
    chunk_gated_delta_rule_fwd_h_kernel,
)
from kernels.delta_rule.chunk_o import chunk_bwd_dqkwg_kernel, chunk_fwd_o_kernel  # noqa: E402
from kernels.delta_rule.tiling import block, num_warps, state_block  # noqa: E402
from kernels.delta_rule.wy_fast import prepare_wy_repr_bwd_kernel, prepare_wy_repr_fwd_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# pointer arguments that are float32 whatever the input dtype (gates, their cumsum, T, gradients kept in fp32)
FP32 = {"beta", "g", "gc", "A", "h0", "ht", "dht", "dh0", "dq", "dk", "dw", "dbeta", "dgc", "dg"}
SCALARS = {"T": "i32", "scale": "fp32"}


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
        (chunk_gated_delta_rule_fwd_h_kernel, {**seq, "USE_INITIAL_STATE": state, "STORE_FINAL_STATE": state},
         w, 1, set(), none_g | none_state),
        (chunk_fwd_o_kernel, chunk, w, 3, set(), none_g),
        (chunk_gated_delta_rule_bwd_dhu_kernel,
         {**seq, "USE_INITIAL_STATE": state, "USE_FINAL_STATE_GRADIENT": state}, w, 2, set(), none_g | none_state),
        (chunk_bwd_dqkwg_kernel, chunk, w, 3, set(), none_g),
        (prepare_wy_repr_bwd_kernel, chunk, w, 3, {"dv"}, none_g),
    ]  # fmt: skip


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
    parser.add_argument("--quick", action="store_true", help="one variant (bf16, gated, BT 64, D 128); no files")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default, set to silence its warning
    variants = [("bf16", 64, 128, True, True)]
    if not args.quick:
        variants += [("bf16", 64, 128, False, False), ("bf16", 64, 64, True, True), ("bf16", 32, 128, True, True),
                     ("fp16", 64, 128, True, True), ("fp32", 64, 128, True, True)]  # fmt: skip
    rows = []
    for dtype, BT, D, gated, state in variants:
        for kernel, constexprs, warps, stages, fp32_extra, none in launches(BT, D, D, gated, state):
            row = build(kernel, constexprs, warps, stages, fp32_extra, none, dtype)
            row.update(dtype=dtype, chunk_size=BT, head_dim=D, gated=gated, state=state)
            rows.append(row)
            print(
                f"{dtype} BT={BT} D={D} {'gated' if gated else 'ungated'}{' +state' if state else ''} "
                f"{row['kernel']:40s} warps={warps} stages={stages} regs={row['registers']} "
                f"spill={row['spill_bytes']} B shared={row['shared_bytes']} B"
            )
    if args.quick:
        return
    lines = ["| dtype | BT | D | variant | kernel | warps | stages | registers | spill bytes | shared bytes |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        variant = ("gated" if r["gated"] else "ungated") + (" + state" if r["state"] else "")
        lines.append(
            f"| {r['dtype']} | {r['chunk_size']} | {r['head_dim']} | {variant} | {r['kernel']} | {r['num_warps']} | "
            f"{r['num_stages']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} |"
        )
    note = (
        f"Built with triton {triton.__version__} for sm_90 without a GPU (ptxas from the triton wheel); H = 16, "
        "K = V = D. Registers per thread (255 is the ceiling), stack bytes spilled per thread, shared memory per "
        "program. The fp32 rows use IEEE products."
    )
    meta = {"triton": triton.__version__, "target": "cuda sm_90"}
    write_results("kernel-build", "sm90", meta, rows, lines, note)


if __name__ == "__main__":
    main()
