"""Fewer OpenMP wake-ups on CPU: element-wise ATen work on the calling thread alone, matrix products
(MKL) still on all intra-op threads — for the qTTT step loop, whose thousands of small ops per step
each wake the sleeping OpenMP team.

Why: the app, the tests and the benches run with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once
after a parallel region; spinning makes runs several times slower when other processes share the
two cores). Then every ATen op above its grain size pays a futex wake-up of the other thread. A qTTT
step on a ≈1k-token needle prompt runs ≈4,000 ATen ops (≈450 of them matrix products). Measured
on this 2-core AMD EPYC with PASSIVE, 2026-12-03 (the machine is shared and noisy): the 16-step
needle task, 8 fresh processes each way, alternated: median 15.5 s with the context, 16.7 s without
(≈7 %; every pair's first run faster with it); `bench/experiments.py` medians of 3: 15.0 vs 17.4 s
in one run, 17.5 vs 17.6 s in the next. Records identical (max difference 0.0). Spinning threads
(GOMP_SPINCOUNT=10000) were as fast alone but 2.4× slower with two such processes on the cores, so
they are not used. Only qTTT opts in (`engine.EngineRun.gemm_threads_only`): paper GD's batched
leave-one-out ops are large and ran 1.4× slower inside. Inside `gemm_threads_only()` the calling thread's OpenMP ``nthreads`` ICV is 1, so ATen's
``parallel_for`` runs inline, while MKL keeps ``torch.get_num_threads()`` threads for its own
(thread-local, ``mkl_set_num_threads_local``) parallel regions: one wake-up per matrix product.

Both settings are per thread (OpenMP ICVs and MKL's local thread count), so a session running a
qTTT loop never changes another session's threads; both are restored on exit. Without GNU OpenMP
or MKL's symbols (another build of torch) the context does nothing (`available()` says which).

Numerics: matrix products are MKL's with the same thread count as outside; element-wise ops do
not depend on the thread count; only whole-tensor reductions split across threads (a global
norm, a loss sum) may round differently — the qTTT records agree with those outside the context to
float32 round-off (tests/unit/test_cpu_threads.py, bench/experiments.py `records_max_abs_diff`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from functools import lru_cache
from typing import Iterator

import torch

#: environment switch: "0" turns the context into a no-op (to measure the difference)
ENV = "TTT_LENS_GEMM_THREADS_ONLY"


@lru_cache(maxsize=1)
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """(libgomp, the library exporting MKL's service functions) as torch loaded them, or None."""
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    try:
        gomp = ctypes.CDLL(os.path.join(libdir, "libgomp.so.1"), mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        mkl = ctypes.CDLL(os.path.join(libdir, "libtorch_cpu.so"), mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        for name in ("omp_set_num_threads", "omp_get_max_threads"):
            getattr(gomp, name)
        mkl.MKL_Set_Num_Threads_Local.argtypes = [ctypes.c_int]      # the C (by-value) entry; the lowercase one is Fortran
        mkl.MKL_Set_Num_Threads_Local.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    gomp.omp_set_num_threads.argtypes = [ctypes.c_int]
    gomp.omp_get_max_threads.restype = ctypes.c_int
    return gomp, mkl


def available() -> bool:
    """Whether this torch build has GNU OpenMP and MKL's thread-local thread count (else no-op)."""
    return _libs() is not None and torch.backends.mkl.is_available()


def enabled() -> bool:
    """available() and not switched off by TTT_LENS_GEMM_THREADS_ONLY=0."""
    return available() and os.environ.get(ENV, "1").strip() != "0"


@contextlib.contextmanager
def gemm_threads_only() -> Iterator[int]:
    """Within the block, on this thread: ATen's element-wise parallel loops run inline (OpenMP
    nthreads ICV = 1) and MKL matrix products keep `torch.get_num_threads()` threads. Yields the
    MKL thread count in force (1 = nothing changed: one thread anyway, or not `enabled()`).
    Enter and leave it on the same thread (it is not for holding across a generator's yield)."""
    n = torch.get_num_threads()          # also runs ATen's per-thread lazy init before we change the ICV
    libs = _libs() if n > 1 and enabled() else None
    if libs is None:
        yield 1
        return
    gomp, mkl = libs
    before = gomp.omp_get_max_threads()
    prev_local = mkl.MKL_Set_Num_Threads_Local(n)
    gomp.omp_set_num_threads(1)
    try:
        yield n
    finally:
        gomp.omp_set_num_threads(before)
        mkl.MKL_Set_Num_Threads_Local(prev_local)
