"""What every benchmark shares: the device and its label, the timing loops, peak memory, the results files; and,
for the op benchmarks (``bench/ops/``), their run settings, shapes, error rows and table cells."""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import torch

from nlplatform.models.base import flush_denormals

RESULTS = Path(__file__).resolve().parent / "results"
flush_denormals()  # as training does, before any torch work starts worker threads


def device_and_label() -> tuple[str, str]:
    """("cuda", the GPU's name) when a GPU is present, else ("cpu", "cpu-<threads>threads"): results files are named
    after the label, so figures from different machines sit side by side."""
    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name()
    return "cpu", f"cpu-{torch.get_num_threads()}threads"


def peak_mem_gib(device: str) -> float:
    """GPU: torch's peak allocation since the last reset; CPU: the process's peak resident set so far (a running
    high-water mark, so an upper bound for rows measured after heavier ones)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def wall_times(step: Callable[[], object], iters: int, device: str, warmup: int = 2) -> list[float]:
    """Wall time of each of ``iters`` calls of ``step`` after ``warmup`` calls (allocator, kernels, autotuning),
    synchronising the GPU around each call; the GPU's peak-memory counter is reset after the warm-up."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def median_seconds(step: Callable[[], object], iters: int, device: str, warmup: int = 2) -> float:
    """Median of ``wall_times``."""
    return statistics.median(wall_times(step, iters, device, warmup))


def median_cuda_event_seconds(step: Callable[[], object], iters: int, warmup: int = 2) -> float:
    """Median GPU time of ``step`` over ``iters`` calls after ``warmup`` calls, each call timed by a pair of CUDA
    events recorded around it on the current stream; the GPU's peak-memory counter is reset after the warm-up. For
    timing kernels (``median_seconds`` is the wall-clock loop); needs a CUDA device."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)  # elapsed_time is in milliseconds
    return statistics.median(times)


def _child_init(threads: int) -> None:
    torch.set_num_threads(threads)


def in_child(fn, *args, threads: int, **kw) -> dict:
    """``fn(*args, **kw)`` in a fresh spawned process; an exception or a killed child becomes an error entry."""
    try:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=_child_init, initargs=(threads,)) as pool:
            return pool.submit(fn, *args, **kw).result()
    except Exception as exc:  # out of memory, a crash, a killed child
        return {"error": error_text(exc)}


def error_text(exc: BaseException) -> str:
    """``"<type>: <first line of the message>"``, at most 300 characters: what a results file keeps of a failure."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def write_results(
    name: str, label: str, meta: dict, rows: list[dict], table: list[str], note: str = "", folder: Path = RESULTS
) -> Path:
    """``<folder>/<name>-<label>.json`` (meta + rows) and ``.md`` (a header line, the table, the note); the folder is
    ``bench/results`` unless given."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = label.replace(" ", "_")
    meta = {"device": label, "torch": torch.__version__, "platform": platform.platform(), **meta}
    path = folder / f"{name}-{tag}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    body = f"Device: {label}, torch {torch.__version__}\n\n" + "\n".join(table) + "\n"
    (folder / f"{name}-{tag}.md").write_text(body + (f"\n{note}\n" if note else ""))
    print(f"results: {path}")
    return path


# ------------------------------------------------------------------------------------- the op benchmarks (bench/ops)

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
PASSES = ("fwd", "fwd+bwd")  # the forward call on inputs that require grad; the forward then backward(dy)
CPU_T_DIVISOR, CPU_MAX_HEADS = 16, 4  # the GPU default shapes are far too big for a small CPU


class Run(NamedTuple):
    """What every measurement of one op-benchmark invocation shares."""

    device: str
    label: str
    dtype: torch.dtype
    repeats: int
    warmup: int
    out: Path

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def parse_int_tuples(text: str, names: str, example: str) -> list[tuple[int, ...]]:
    """``"a,b,c;a,b,c"`` -> [(a, b, c), ...] of positive integers, one field per comma-separated name in ``names``;
    as an argparse ``type`` its error becomes a usage message and exit code 2."""
    n = len(names.split(","))
    shapes = []
    for part in text.split(";"):
        if not part.strip():
            continue
        try:
            shape = tuple(int(f.strip()) for f in part.split(","))
        except ValueError:
            shape = ()
        if len(shape) != n or min(shape) <= 0:
            raise argparse.ArgumentTypeError(
                f"malformed shape {part.strip()!r}: each shape is {n} positive integers {names}, shapes separated by "
                f'";", e.g. "{example}"'
            )
        shapes.append(shape)
    if not shapes:
        raise argparse.ArgumentTypeError(f'no shape given: expected {names}[;{names}...], e.g. "{example}"')
    return shapes


def shapes_arg(names: str, example: str) -> Callable[[str], list[tuple[int, ...]]]:
    """An argparse ``type`` for ``--shapes``-like options (see ``parse_int_tuples``)."""
    return lambda text: parse_int_tuples(text, names, example)


def shapes_text(shapes: Sequence[Sequence[int]]) -> str:
    """The inverse of ``parse_int_tuples``: ``"a,b,c;a,b,c"``."""
    return ";".join(",".join(map(str, s)) for s in shapes)


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def pick_shapes(given: list | None, defaults: list, run: Run, flag: str) -> tuple[list, str]:
    """The shapes to time and where they came from (recorded in the results): ``given`` by ``flag``, else the
    defaults, on a CPU scaled down to (B, T / 16, min(H, 4), D, ...), the fields after D kept."""
    if given is not None:
        return given, flag
    if run.cuda:
        return list(defaults), "default"
    scaled = [(B, max(1, T // CPU_T_DIVISOR), min(H, CPU_MAX_HEADS), *rest) for B, T, H, *rest in defaults]
    return scaled, f"default scaled for CPU: T / {CPU_T_DIVISOR}, H at most {CPU_MAX_HEADS}"


def grad_step(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], dy: torch.Tensor, pass_: str):
    """One timed call: clear the leaves' gradients, run ``forward``, and for fwd+bwd backpropagate ``dy``."""

    def step() -> None:
        for x in leaves:
            x.grad = None
        y = forward()
        if pass_ == "fwd+bwd":
            y.backward(dy.to(y.dtype))  # under autocast y may come out in another dtype than dy

    return step


def median_time(step: Callable[[], object], run: Run) -> float:
    """Median seconds of ``step``: CUDA events on a GPU, the wall clock on a CPU."""
    if run.cuda:
        return median_cuda_event_seconds(step, run.repeats, warmup=run.warmup)
    return median_seconds(step, run.repeats, run.device, warmup=run.warmup)


def timed_row(row: dict, tokens: int, run: Run, seconds: Callable[[], float]) -> dict:
    """Fill ``row``'s ms_median, tokens_per_sec (tokens / median seconds) and peak_mem_gib from ``seconds()``; a
    failure (out of memory included) becomes the row's ``error`` instead of ending the run. The row lists these
    fields already (None), so they keep their place in the JSON."""
    try:
        median = seconds()
        row |= {"ms_median": 1000 * median, "tokens_per_sec": tokens / median, "peak_mem_gib": peak_mem_gib(run.device)}
    except Exception as e:  # one broken contestant or shape must not end the run
        row["error"] = error_text(e)
    # The failed call's tensors are unreachable once the exception is gone: hand their memory back before the next.
    gc.collect()
    if run.cuda:
        torch.cuda.empty_cache()
    return row


def print_row(what: str, row: dict) -> None:
    if row["error"]:
        print(f"{what}: {row['error']}")
    else:
        print(
            f"{what}: {row['ms_median']:10.3f} ms  {row['tokens_per_sec']:>13,.0f} tokens/s  "
            f"{row['peak_mem_gib']:7.2f} GiB"
        )


def fmt_ms(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["error"]:
        return "OOM" if row["error"].startswith("OutOfMemoryError") else "error"
    ms = row["ms_median"]
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_gib(row: dict | None) -> str:
    return "-" if row is None or row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}"


def fmt_tokens(row: dict | None) -> str:
    return "-" if row is None or row["tokens_per_sec"] is None else f"{row['tokens_per_sec']:,.0f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratio_cell(row: dict | None, key: str) -> str:
    return fmt_ratio(row[key] if row is not None else None)


def ms_ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    """numerator ms / denominator ms when both rows were measured."""
    if numerator is None or denominator is None or numerator["error"] or denominator["error"]:
        return None
    return numerator["ms_median"] / denominator["ms_median"]


def import_failure(module: str) -> str | None:
    """None when ``module`` imports, else why not (a peer that is not installed, or a broken install)."""
    try:
        __import__(module)
    except Exception as e:  # ImportError, or an install that fails while importing (CUDA or triton bits)
        return f"import {module} failed ({error_text(e)})"
    return None


def timed_description(run: Run, what: str) -> str:
    timing = "CUDA-event" if run.cuda else "wall-clock"
    return f"median of {run.repeats} {timing} timings after {run.warmup} warm-up calls; {what}"


def announce(op: str, skipped: dict[str, str], label: str, shapes: list) -> None:
    """What an op's run will time: the contestants left out (and why) and the shapes."""
    print(f"== {op}")
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}")
    print(f"{label}: " + "  ".join(shape_text(s) for s in shapes))


def goal_sentence(goal: str, ratios: list[float], target: float, run: Run, rows: str) -> str:
    """How the measured speed-ups stand against ``target`` (higher is better)."""
    if not ratios:
        return f"{goal}: not measured in this run (no {rows} with both figures)."
    met = sum(r >= target for r in ratios)
    return f"{goal}: {run.dtype_name} on {run.label}, met in {met} of {len(ratios)} {rows} (lowest {min(ratios):.2f})."


def finish(
    name: str,
    run: Run,
    meta: dict,
    rows: list[dict],
    lines: list[str],
    sentences: list[str],
    shapes_source: str,
    skipped: dict[str, str],
) -> None:
    """Close the note (timing, shapes, what peak memory means, who did not run, what failed), write the results
    files, print the table."""
    sentences = [
        *sentences,
        f"Median of {run.repeats} {'CUDA-event' if run.cuda else 'wall-clock'} timings after {run.warmup} warm-up "
        "calls.",
        f"Shapes: {shapes_source}.",
        "Peak GiB is torch's peak allocation over the timed calls, inputs and gradients included."
        if run.cuda
        else "Peak GiB is the process's running RSS peak.",
    ]
    if skipped:
        sentences.append("Not run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ".")
    errors = sum(1 for r in rows if r["error"])
    if errors:
        sentences.append(f"{errors} measurement(s) failed: see the rows' error field in the JSON.")
    meta = {
        "threads": torch.get_num_threads(),
        "dtype": run.dtype_name,
        **meta,
        "shapes_source": shapes_source,
        "skipped": skipped,
        "errors": errors,
    }
    note = " ".join(sentences)
    write_results(name, run.label, meta, rows, lines, note, run.out)
    print("\n" + "\n".join(lines) + "\n\n" + note)
