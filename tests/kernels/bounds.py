"""Out-of-bounds detection for Triton kernels run by the CPU interpreter.

On a GPU an address past a tensor's storage is an illegal memory access that kills the CUDA context (or, when it
stays inside the allocator's segment, silently reads or corrupts a neighbour); the interpreter reads and writes raw
host addresses and notices neither. ``checked_bounds()`` makes it notice: every load and store of an interpreted
launch must touch, on every unmasked lane, bytes inside the storage of one of that launch's tensor arguments, else
an AssertionError is raised inside the kernel, so the traceback names the kernel's source line.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np


@contextmanager
def checked_bounds():
    from triton.runtime import interpreter as interp

    ranges: list[tuple[int, int]] = []  # [start, end) byte ranges of the current launch's tensor storages
    real_init = interp.GridExecutor._init_args_hst
    real_load = interp.InterpreterBuilder.create_masked_load
    real_store = interp.InterpreterBuilder.create_masked_store

    def init(self, args_dev, kwargs):
        args_hst, kwargs_hst = real_init(self, args_dev, kwargs)
        ranges.clear()
        for arg in [*args_hst, *kwargs_hst.values()]:
            if hasattr(arg, "untyped_storage"):
                storage = arg.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        return args_hst, kwargs_hst

    def check(ptrs, mask, itemsize: int, what: str) -> None:
        addr = np.asarray(ptrs.data, dtype=np.uint64)
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        addr = addr[live]
        if addr.size == 0:
            return
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi in ranges:
            inside |= (addr >= lo) & (addr + itemsize <= hi)
        if not inside.all():
            bad = addr[~inside]
            raise AssertionError(
                f"{what} out of bounds on {bad.size} of {addr.size} lanes (first address {int(bad[0]):#x}; "
                f"the launch's tensors span {[(hex(lo), hi - lo) for lo, hi in ranges]})"
            )

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check(ptrs, mask, interp._get_np_dtype(ptrs.get_element_ty()).itemsize, "load")
        return real_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check(ptrs, mask, np.asarray(value.data).dtype.itemsize, "store")
        return real_store(self, ptrs, value, mask, cache_policy)

    interp.GridExecutor._init_args_hst = init
    interp.InterpreterBuilder.create_masked_load = load
    interp.InterpreterBuilder.create_masked_store = store
    try:
        yield
    finally:
        interp.GridExecutor._init_args_hst = real_init
        interp.InterpreterBuilder.create_masked_load = real_load
        interp.InterpreterBuilder.create_masked_store = real_store
