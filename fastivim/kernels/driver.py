"""The parallel voxel loop: one compiled kernel serves both methods.

``fit_volume`` walks a C-contiguous ``(n_vox, n_b)`` matrix in ``prange`` chunks. Scratch space
is allocated once per chunk (a handful of chunks per thread), never per voxel; each voxel's
result lands in its own row of ``out`` and its own ``status`` entry, so threads never share
writes. The voxel-independent tables (b-value groups, grids, Gram matrices) come from
:func:`make_tables`, built once in NumPy.
"""

import numpy as np
from numba import prange

from . import status as st
from ._jit import jit_parallel, jit_voxel
from .full import fit_full_voxel
from .segmented import fit_segmented_voxel
from .voxel import fail_voxel, finish_voxel, group_means, internal_bounds

METHOD_SEGMENTED = 0
METHOD_FULL = 1

#: Grid sizes of the starting-point searches (log-spaced over the bounds).
N_DSTAR_GRID = 12
N_D_GRID = 10

#: Lowest grid values (mm²/s) when a lower bound is below them; the fit itself still reaches
#: down to the bound.
GRID_FLOOR_D = 5e-5
GRID_FLOOR_DSTAR = 1e-3

#: Chunks per thread: enough for load balance, few enough that scratch is negligible.
CHUNKS_PER_THREAD = 16


def _start_grid(bound, floor, n):
    """``n`` log-spaced starting values inside ``bound`` (lo, hi), internal units.

    The grid only seeds the solvers, so it starts at ``floor`` when the lower bound is below it
    (a bound of 0, as OSIPI's D bound, would otherwise spend the grid on decades where no
    tissue lives, or fail: a geometric sequence cannot include 0).
    """
    lo, hi = float(bound[0]), float(bound[1])
    if not hi > 0.0:
        return np.zeros(n)
    return np.geomspace(max(lo, min(floor, hi)), hi, n)


def make_tables(b_values, bounds):
    """Voxel-independent inputs of :func:`fit_volume`.

    Parameters
    ----------
    b_values : (n_b,) float64
        b-values in s/mm², in the column order of the signal matrix.
    bounds : (4, 2) float64
        Bounds in :data:`fastivim.model.PARAM_NAMES` order, user units.

    Returns
    -------
    dict
        ``groups`` (n_b,) int64, ``bu`` (n_u,) unique b in ms/µm², ``w`` (n_u,) group sizes,
        ``dstar_grid`` (n_k,), ``d_grid`` (n_j,) in µm²/ms, ``ES`` (n_k, n_u), ``ED`` (n_j, n_u),
        ``GSS`` (n_k,) weighted squared norms of the ``ES`` rows, and ``PAIR`` (n_j, n_k, 7):
        per (D_j, D_star_k) pair the inverse Gram entries ``G_DD/det, G_SD/det, G_SS/det``
        (NaN for numerically singular pairs), then the inverse squared norms of
        ``f*ES + (1-f)*ED`` at the lower and upper f bound, then those squared norms.
    """
    b = np.asarray(b_values, dtype=np.float64)
    b_unique, groups = np.unique(b, return_inverse=True)
    w = np.bincount(groups).astype(np.float64)
    bu = b_unique * 1e-3
    dstar_grid = _start_grid(bounds[2] * 1e3, GRID_FLOOR_DSTAR * 1e3, N_DSTAR_GRID)
    d_grid = _start_grid(bounds[3] * 1e3, GRID_FLOOR_D * 1e3, N_D_GRID)
    ES = np.exp(-np.outer(dstar_grid, bu))
    ED = np.exp(-np.outer(d_grid, bu))
    GSS = (ES * ES) @ w
    GDD = (ED * ED) @ w
    GSD = (ED * w) @ ES.T  # (n_j, n_k)
    det = GSS[None, :] * GDD[:, None] - GSD**2
    singular = det <= 1e-12 * GSS[None, :] * GDD[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(singular, np.nan, 1.0 / det)
    pair = np.empty(GSD.shape + (7,))
    pair[..., 0] = GDD[:, None] * inv
    pair[..., 1] = GSD * inv
    pair[..., 2] = GSS[None, :] * inv
    for col, fb in ((3, bounds[1, 0]), (4, bounds[1, 1])):
        gv = fb * fb * GSS[None, :] + 2 * fb * (1 - fb) * GSD + (1 - fb) ** 2 * GDD[:, None]
        pair[..., col] = 1.0 / gv
        pair[..., col + 2] = gv
    return {
        "groups": groups.astype(np.int64),
        "bu": bu,
        "w": w,
        "dstar_grid": dstar_grid,
        "d_grid": d_grid,
        "ES": np.ascontiguousarray(ES),
        "ED": np.ascontiguousarray(ED),
        "GSS": GSS,
        "PAIR": pair,
    }


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
def fit_volume(Y, method, groups, bu, w, bounds, b_min, ES, ED, GSS, PAIR, dstar_grid,
               d_grid, maxit, n_chunks, out, status):
    """Fit every row of ``Y`` (n_vox, n_b) in parallel.

    Parameters
    ----------
    Y : (n_vox, n_b) float32 or float64, C-contiguous
        Raw signal, one voxel per row, columns in the order of ``groups``.
    method : int
        :data:`METHOD_SEGMENTED` or :data:`METHOD_FULL`.
    groups, bu, w, ES, ED, GSS, PAIR, dstar_grid, d_grid
        Tables from :func:`make_tables`.
    bounds : (4, 2) float64
        Bounds in user units.
    b_min : float
        High-b threshold for the segmented step, ms/µm².
    maxit : int
        Iteration limit of each Levenberg–Marquardt run.
    n_chunks : int
        Number of voxel ranges handed to ``prange`` (a few per thread: see
        :func:`chunk_count`; computed outside because ``numba.get_num_threads`` inside a
        kernel defeats the on-disk cache).
    out : (n_vox, 6) float32, output
        S0, f, D_star, D (mm²/s), R², RMSE per voxel.
    status : (n_vox,) uint8, output
        Status code per voxel (:mod:`fastivim.kernels.status`).
    """
    n = Y.shape[0]
    nu = bu.shape[0]
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
        PS = np.empty(dstar_grid.shape[0])
        PD = np.empty(d_grid.shape[0])
        prof = np.empty((4, dstar_grid.shape[0]))
        work = np.empty(2 * nu + 16)
        mat = np.empty((3, 4, 4))
        free = np.empty(4, dtype=np.bool_)
        for v in range(start, stop):
            status[v] = fit_one_voxel(Y, v, method, groups, bu, w, bounds, b_min, ES, ED, GSS,
                                      PAIR, dstar_grid, d_grid, maxit, out, ybar, model, r,
                                      p, starts, lo, hi, PS, PD, prof, work, mat, free, p2,
                                      lo2, hi2)
