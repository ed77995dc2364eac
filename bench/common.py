"""What every benchmark script shares: the device and its label, the timing loop, peak memory, the results files."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

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
        text = str(exc).strip()
        return {"error": f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]}


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
