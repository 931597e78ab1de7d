"""The voxel-loop kernels really compile in parallel (numba-stats ``test_njit`` style).

Every least-squares kernel is checked: the block kernel of each method (one compiled kernel per
method, so that a run compiles only its own) and the scalar reference. A kernel that declares
``parallel=True`` but whose ``prange`` loop cannot be turned into a parfor silently runs
serially; numba only says so through a ``NumbaPerformanceWarning``. These tests recompile the
kernel from its Python source without the on-disk cache (a cached load would not warn), with
every warning turned into an error, and check the parfor count.
"""

from __future__ import annotations

import os
import warnings

import numba
import numpy as np
import pytest

import fastivim
import fastivim.methods.least_squares as least_squares
from fastivim.kernels import block, driver
from fastivim.kernels.tables import METHOD_FULL, METHOD_SEGMENTED

pytestmark = pytest.mark.jit_only

#: kernel name -> its dispatcher
KERNELS = {"block-segmented": block.fit_segmented_blocks, "block-full": block.fit_full_blocks,
           "scalar": driver.fit_volume}

#: the kernel that fits each method on the block path
BLOCK_OF = {"segmented": "block-segmented", "full": "block-full"}


def _fresh(parallel: bool, kernel):
    """A cache-free recompilation of a kernel with the project's options."""
    dispatcher = KERNELS[kernel]
    opts = {k: v for k, v in dispatcher.targetoptions.items() if k != "nopython"}
    opts["parallel"] = parallel
    return numba.njit(cache=False, **opts)(dispatcher.py_func)


#: Enough voxels that fit_voxels takes the multi-threaded path (small calls run on one thread)
#: and several chunks per thread; fewer when the JIT is off (pure Python is slow).
N_THREADED = max(least_squares.SERIAL_BELOW + 1, 2500) if not os.environ.get(
    "NUMBA_DISABLE_JIT") == "1" else 64


def _fit_with(monkeypatch, compiled, method, kernel):
    if kernel == "scalar":
        monkeypatch.setattr(least_squares, "fit_volume", compiled)
    else:
        code = METHOD_FULL if kernel == "block-full" else METHOD_SEGMENTED
        monkeypatch.setitem(block.BLOCK_KERNELS, code, compiled)
    ph = fastivim.simulate.phantom((N_THREADED,), snr=None, seed=3)
    return fastivim.fit_voxels(ph.signal.astype(np.float64), ph.b_values, method=method,
                               _kernel="scalar" if kernel == "scalar" else "block")


def test_the_api_calls_these_kernels():
    """fit_voxels reaches exactly these dispatchers: one block kernel per method, the scalar
    reference through ``_kernel="scalar"``."""
    assert least_squares.fit_volume is driver.fit_volume
    assert block.BLOCK_KERNELS == {METHOD_FULL: block.fit_full_blocks,
                                   METHOD_SEGMENTED: block.fit_segmented_blocks}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_declares_parallel(kernel):
    """The dispatcher that the API calls was built with parallel=True and an on-disk cache."""
    dispatcher = KERNELS[kernel]
    assert dispatcher.targetoptions["parallel"] is True
    assert dispatcher._cache.__class__.__name__ != "NullCache"
    flags = dispatcher.targetoptions["fastmath"]
    # NaN/inf checks must stay meaningful: no nnan/ninf (nor the all-in fastmath=True)
    assert flags is not True
    assert not {"nnan", "ninf", "fast"} & set(flags)


@pytest.mark.parametrize("kernel,method", [("block-segmented", "segmented"),
                                           ("block-full", "full"), ("scalar", "segmented"),
                                           ("scalar", "full")])
def test_parallel_compiles_without_fallback(monkeypatch, method, kernel):
    """Warnings as errors: no NumbaPerformanceWarning / NumbaParallelSafetyWarning, >= 1 parfor."""
    compiled = _fresh(parallel=True, kernel=kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error", numba.NumbaWarning)
        warnings.simplefilter("error", numba.NumbaPerformanceWarning)
        warnings.simplefilter("error", numba.core.errors.NumbaParallelSafetyWarning)
        res = _fit_with(monkeypatch, compiled, method, kernel)
    (cres,) = compiled.overloads.values()
    diagnostics = cres.metadata["parfor_diagnostics"]
    assert diagnostics.count_parfors() >= 1, "prange loop was not converted to a parfor"
    assert np.all(np.isfinite(res.D))
    # numba's own pipeline (``_fresh``) and the shipped kernel's, whose nested libraries are
    # link-only (optimised once, in the kernel): the same machine arithmetic, the same bits
    monkeypatch.undo()
    shipped = _fit_with(monkeypatch, KERNELS[kernel], method, kernel)
    np.testing.assert_array_equal(shipped.status, res.status)
    for name in ("S0", "f", "D_star", "D", "rmse"):
        np.testing.assert_array_equal(getattr(shipped, name), getattr(res, name), err_msg=name)


@pytest.mark.parametrize("method", ["full", "segmented"])
def test_parallel_equals_serial(monkeypatch, method):
    """Voxels are independent: the parallel and serial builds agree voxel by voxel."""
    kernel = BLOCK_OF[method]
    serial = _fit_with(monkeypatch, _fresh(parallel=False, kernel=kernel), method, kernel)
    parallel = _fit_with(monkeypatch, _fresh(parallel=True, kernel=kernel), method, kernel)
    np.testing.assert_array_equal(serial.status, parallel.status)
    for name in ("S0", "f", "D_star", "D"):
        np.testing.assert_allclose(getattr(parallel, name), getattr(serial, name), rtol=1e-5,
                                   err_msg=name)


def test_thread_count_does_not_change_results():
    """One thread or all threads: the same maps (chunking must not leak between voxels)."""
    ph = fastivim.simulate.phantom((N_THREADED,), snr=40, seed=11)
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = fastivim.fit_voxels(ph.signal, ph.b_values, method="full")
    finally:
        numba.set_num_threads(n)
    many = fastivim.fit_voxels(ph.signal, ph.b_values, method="full")
    np.testing.assert_array_equal(one.status, many.status)
    for name in ("S0", "f", "D_star", "D", "rmse"):
        np.testing.assert_array_equal(getattr(one, name), getattr(many, name), err_msg=name)


def test_results_are_bitwise_reproducible_call_to_call():
    """The same voxels give the same bits on every call, whatever was fitted in between.

    Regression: with the ``reassoc`` fast-math flag, sums were ordered by where the kernel's
    scratch happened to be allocated (which depends on earlier calls), so a voxel whose starts
    tie (noise only, f at 0, D_star undetermined) alternated between two answers (29 of 60
    calls in this churn before the fix, 0 after).
    """
    ph = fastivim.simulate.phantom((6, 5), snr=40, seed=4)  # includes noise-only voxels
    signal = np.ascontiguousarray(ph.signal.reshape(-1, ph.b_values.size))
    first = fastivim.fit_voxels(signal, ph.b_values, method="full")
    rng = np.random.default_rng(0)
    for i in range(60):
        # fits of other sizes in between: the allocator hands the next call other addresses
        n, nb = int(rng.integers(1, 50)), int(rng.integers(4, 25))
        junk = rng.normal(500.0, 200.0, (n, nb)).astype(np.float32 if i % 2 else np.float64)
        junk_b = np.concatenate([[0.0, 50.0], np.linspace(200, 1000, nb - 2)])
        fastivim.fit_voxels(junk, junk_b,
                            method="full" if i % 3 else "segmented")
        again = fastivim.fit_voxels(signal, ph.b_values, method="full")
        for name in ("S0", "f", "D_star", "D", "rmse"):
            np.testing.assert_array_equal(getattr(again, name), getattr(first, name),
                                          err_msg=f"{name}, call {i}")


ONCE_CHILD = r"""
import collections, numpy as np
from numba.core import codegen
emitted = collections.Counter()
finalize = codegen.JITCodeLibrary._finalize_specific
def counting(self):
    emitted[self.name] += 1
    finalize(self)
codegen.JITCodeLibrary._finalize_specific = counting
from fastivim import compiling
from fastivim.kernels import block
compiling.compile_kernels(("segmented",))
print(sorted(emitted))
# a helper the kernel compiled (same signature), called from Python
PL = np.zeros(block.PL_ROWS * block.PERFUSION_LANES)
block._perfusion_step(PL, 200)
print("called")
"""


def test_a_kernel_is_optimised_and_emitted_once(tmp_path):
    """The first run's compile (the segmented kernel and the output kernel) turns into machine
    code only those two kernels' libraries: never the nested libraries that each held the
    whole fit (chunk, block, parfor body, gufunc wrappers: five extra optimisations of the same
    code in numba's default pipeline), nor any helper. A helper compiled under the kernel still
    runs from Python (through its twin, :func:`fastivim.kernels._jit.python_callable`)."""
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", ONCE_CHILD], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    names, called = out.stdout.strip().splitlines()[-2:]
    emitted = eval(names)  # a printed list of library names
    # numba's runtime library ("nrt") is compiled on first use, whichever function that is
    assert set(emitted) - {"nrt"} == {"fit_segmented_blocks", "split_columns"}, emitted
    assert called == "called"
