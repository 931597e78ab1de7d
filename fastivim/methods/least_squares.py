"""Driving the compiled least-squares kernels, shared by :mod:`.segmented` and :mod:`.full`.

Each method has its own compiled block kernel (:data:`fastivim.kernels.block.BLOCK_KERNELS`,
reached through :func:`~fastivim.kernels.block.fit_volume_block`), so a run compiles only its
own; the scalar reference :func:`fastivim.kernels.driver.fit_volume` takes the method as a
setting. Both methods share the uncertainty pass (:mod:`fastivim.kernels.uncertainty`). The
kernels take float64 rows (:func:`fastivim.methods._blocks.run_in_float64_blocks`).
"""

from __future__ import annotations

import numpy as np

from ..compiling import watch_compiles
from ..kernels import ensure_fresh_cache, uncertainty
from ..kernels.block import fit_volume_block
from ..kernels.driver import chunk_count, fit_volume
from ..kernels.tables import METHOD_FULL, make_settings, make_tables
from ..model import bounds_array
from . import MethodOutput
from ._blocks import float64_rows, run_in_float64_blocks

#: Columns of the kernels' per-voxel output rows (every method returns them in this order).
OUTPUT_COLUMNS = ("S0", "f", "D_star", "D", "r_squared", "rmse")

#: Iteration limit of each Levenberg–Marquardt run (accepted plus rejected steps).
MAX_ITERATIONS = 200

#: Below this many voxels the kernel runs on the calling thread alone (see _fit_on_one_thread).
SERIAL_BELOW = 2048

#: The compiled least-squares kernels: the block kernel (the default, vectorised) and the
#: scalar one-voxel-at-a-time kernel it reproduces (the reference of the equivalence tests and
#: the benchmark, reached with the private ``fit_voxels(..., _kernel="scalar")``).
KERNELS = ("block", "scalar")


def kernel_function(kernel):
    """The compiled kernel named ``kernel``; the first call checks numba's cache is current."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid kernels are {', '.join(KERNELS)}")
    ensure_fresh_cache()
    watch_compiles()
    return fit_volume_block if kernel == "block" else fit_volume


def run_kernel(Y, method_code, b, bounds, b_threshold, progress, kernel="block",
               out_dtype=np.float32):
    """Fit a (n_vox, n_b) matrix; return ``out`` (n_vox, 6) and ``status`` uint8.

    ``out`` is float32 (what the maps store). ``out_dtype=np.float64`` keeps the kernel's
    float64 estimates unrounded (the dipy adapter's float64 parameters): the kernel then
    compiles once more, for that output type.
    """
    n = Y.shape[0]
    out = np.empty((n, len(OUTPUT_COLUMNS)), dtype=out_dtype)
    status = np.empty(n, dtype=np.uint8)
    run = kernel_function(kernel)
    if n == 0:
        return out, status
    tables = make_tables(b, bounds_array(bounds))
    settings = make_settings(method_code, b_threshold, MAX_ITERATIONS)
    if n < SERIAL_BELOW and not progress:
        _fit_on_one_thread(run, float64_rows(Y, 0, n), tables, settings, out, status)
        return out, status

    def fit_block(a, z, Y64):
        run(Y64, tables, settings, chunk_count(z - a), out[a:z], status[a:z])

    run_in_float64_blocks(Y, fit_block, progress)
    return out, status


def _fit_on_one_thread(run, Y, tables, settings, out, status):
    """Run the kernel on the calling thread only: waking the pool costs more than a few hundred
    voxels take (measured: 100 voxels ran at 18k voxels/s on 2 threads, 300k on 1)."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        run(Y, tables, settings, 1, out, status)
    finally:
        numba.set_num_threads(threads)


def ls_uncertainty(Y, code, b, b_threshold, out):
    """SDs (n_vox, 4) float32 of the least-squares maps in ``out`` (see
    :mod:`fastivim.kernels.uncertainty`), in :data:`fastivim.model.PARAM_NAMES` order."""
    n = Y.shape[0]
    sd = np.empty((n, 4), dtype=np.float32)
    if n == 0:
        return sd
    bu, groups = np.unique(b, return_inverse=True)
    w = np.bincount(groups).astype(np.float64)
    kind = uncertainty.KIND_FULL if code == METHOD_FULL else uncertainty.KIND_SEGMENTED
    groups = groups.astype(np.int64)

    def sd_block(a, z, Y64):
        uncertainty.ls_uncertainty(Y64, kind, groups, bu * 1e-3, w, b_threshold * 1e-3,
                                   chunk_count(z - a), out[a:z], sd[a:z])

    run_in_float64_blocks(Y, sd_block, False)
    return sd


def runner(method_code):
    """The ``run(Y, request)`` of the least-squares method ``method_code``."""

    def run(Y, req):
        out, status = run_kernel(Y, method_code, req.b, req.bounds, req.b_threshold,
                                 req.progress, req.kernel)
        sd = ls_uncertainty(Y, method_code, req.b, req.b_threshold, out) \
            if req.uncertainty else None
        return MethodOutput(out, status, sd, {})

    return run
