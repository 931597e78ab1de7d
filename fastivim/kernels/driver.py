"""The parallel voxel loop: one compiled kernel serves both methods.

``fit_volume`` walks a C-contiguous ``(n_vox, n_b)`` matrix in ``prange`` chunks. Scratch space
is allocated once per chunk (a handful of chunks per thread), never per voxel; each voxel's
result lands in its own row of ``out`` and its own ``status`` entry, so threads never share
writes. The voxel-independent tables (b-value groups, grids, Gram matrices) come from
:func:`fastivim.kernels.tables.make_tables`, built once in NumPy.

This is the scalar kernel: one voxel at a time, the reference that the block kernels of
:mod:`fastivim.kernels.block` reproduce (``fit_voxels(..., _kernel="scalar")`` runs it).
"""

import numpy as np
from numba import prange

from . import status as st
from ._jit import jit_parallel, jit_voxel
from .full import fit_full_voxel
from .segmented import fit_segmented_voxel
from .tables import (  # noqa: F401  (re-exported: the scalar kernel's public names)
    METHOD_FULL,
    METHOD_SEGMENTED,
    N_D_GRID,
    N_DSTAR_GRID,
    Settings,
    Tables,
    make_settings,
    make_tables,
)
from .voxel import fail_voxel, finish_voxel, group_means, internal_bounds

#: Chunks per thread: enough for load balance, few enough that scratch is negligible.
CHUNKS_PER_THREAD = 16


def chunk_count(n_vox):
    """Chunks for ``n_vox`` voxels: a few per numba thread, each at least one voxel."""
    import numba

    return max(1, min(n_vox, CHUNKS_PER_THREAD * numba.get_num_threads()))


@jit_voxel
def fit_one_voxel(Y, v, method, groups, bu, w, bounds, b_min, ES, ED, GSS, PAIR, dstar_grid,
                  d_grid, maxit, out, ybar, model, r, p, starts, lo, hi, PS, PD, prof, work,
                  mat, free, p2, lo2, hi2):
    """Fit voxel row ``v`` of ``Y``; write row ``v`` of ``out`` (n_vox, 6); return its status.

    Rows are addressed by index rather than sliced: a view per voxel would cost atomic
    reference-count updates on the hot path.
    """
    scale = group_means(Y, v, groups, w, ybar)
    if not scale > 0.0:  # NaN scale: non-finite samples or no positive signal
        return fail_voxel(out, v, st.BAD_INPUT)
    internal_bounds(bounds, scale, lo, hi)
    if method == METHOD_FULL:
        code = fit_full_voxel(ybar, bu, w, b_min, lo, hi, ES, ED, GSS, PAIR, dstar_grid, d_grid,
                              maxit, p, starts, p2, lo2, hi2, model, r, PS, PD, prof, work, mat,
                              free)
    else:
        code = fit_segmented_voxel(ybar, bu, w, b_min, lo, hi, ES, GSS, dstar_grid, maxit, p,
                                   model, r, work, mat, free, p2, lo2, hi2)
    if code != st.OK:
        return fail_voxel(out, v, code)
    return finish_voxel(Y, v, groups, model, p, scale, lo, hi, out)


@jit_parallel
def fit_volume(Y, tables, settings, n_chunks, out, status):
    """Fit every row of ``Y`` (n_vox, n_b) in parallel, one voxel at a time.

    Parameters
    ----------
    Y : (n_vox, n_b) float32 or float64, C-contiguous
        Raw signal, one voxel per row, columns in the order of ``tables.groups``.
    tables : :class:`fastivim.kernels.tables.Tables`
        From :func:`make_tables`.
    settings : :class:`fastivim.kernels.tables.Settings`
        Method, high-b threshold (ms/µm²) and iteration limit.
    n_chunks : int
        Number of voxel ranges handed to ``prange`` (a few per thread: see
        :func:`chunk_count`; computed outside because ``numba.get_num_threads`` inside a
        kernel defeats the on-disk cache).
    out : (n_vox, 6) float32, output
        S0, f, D_star, D (mm²/s), R², RMSE per voxel.
    status : (n_vox,) uint8, output
        Status code per voxel (:mod:`fastivim.kernels.status`).
    """
    t = tables
    method = settings.method
    b_min = settings.b_min
    maxit = settings.maxit
    n = Y.shape[0]
    nu = t.bu.shape[0]
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        start = c * n // n_chunks
        stop = (c + 1) * n // n_chunks
        ybar = np.empty(nu)
        model = np.empty(nu)
        r = np.empty(nu)
        p = np.empty(4)
        lo = np.empty(4)
        hi = np.empty(4)
        starts = np.empty((3, 4))  # the full fit's alternative starting points
        p2 = np.empty(2)
        lo2 = np.empty(2)
        hi2 = np.empty(2)
        PS = np.empty(t.dstar_grid.shape[0])
        PD = np.empty(t.d_grid.shape[0])
        prof = np.empty((4, t.dstar_grid.shape[0]))
        work = np.empty(2 * nu + 16)
        mat = np.empty((3, 4, 4))
        free = np.empty(4, dtype=np.bool_)
        for v in range(start, stop):
            status[v] = fit_one_voxel(Y, v, method, t.groups, t.bu, t.w, t.bounds, b_min, t.ES,
                                      t.ED, t.GSS, t.PAIR, t.dstar_grid, t.d_grid, maxit, out,
                                      ybar, model, r, p, starts, lo, hi, PS, PD, prof, work, mat,
                                      free, p2, lo2, hi2)
