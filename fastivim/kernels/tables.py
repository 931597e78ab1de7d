"""What every fitting kernel reads besides the signal, grouped in two documented namedtuples.

numba compiles namedtuples of arrays and scalars as plain structs, so a kernel takes
``(Y, tables, settings, ...)`` instead of a dozen positional arrays: fields are read by name,
and two same-dtype arrays can no longer be swapped silently at a call site.
"""

from collections import namedtuple

import numpy as np

METHOD_SEGMENTED = 0
METHOD_FULL = 1

#: Grid sizes of the starting-point searches (log-spaced over the bounds).
N_DSTAR_GRID = 12
N_D_GRID = 10

#: Lowest grid values (mm²/s) when a lower bound is below them; the fit itself still reaches
#: down to the bound.
GRID_FLOOR_D = 5e-5
GRID_FLOOR_DSTAR = 1e-3

Tables = namedtuple(
    "Tables",
    ["groups", "bu", "w", "bounds", "dstar_grid", "d_grid", "ES", "ED", "GSS", "PAIR"],
)
Tables.__doc__ = """Voxel-independent inputs of a fit, built once in NumPy by :func:`make_tables`.

Fields
------
groups : (n_b,) int64
    Index of each sample's unique b-value (column order of the signal matrix).
bu : (n_u,) float64
    Unique b-values in ms/µm² (``b / 1000``), ascending.
w : (n_u,) float64
    Number of samples per unique b-value (the weights of the group means).
bounds : (4, 2) float64
    Bounds in :data:`fastivim.model.PARAM_NAMES` order, user units (mm²/s for D, D_star).
dstar_grid : (n_k,) float64; d_grid : (n_j,) float64
    Log-spaced starting grids of D_star and D, µm²/ms.
ES : (n_k, n_u) float64; ED : (n_j, n_u) float64
    ``exp(-b * D_star_k)`` and ``exp(-b * D_j)``.
GSS : (n_k,) float64
    Weighted squared norms of the ``ES`` rows.
PAIR : (n_j, n_k, 7) float64
    Per (D_j, D_star_k) pair the inverse Gram entries ``G_DD/det, G_SD/det, G_SS/det`` (NaN
    for numerically singular pairs), then the inverse squared norms of ``f*ES + (1-f)*ED`` at
    the lower and upper f bound, then those squared norms.
"""

Settings = namedtuple("Settings", ["method", "b_min", "maxit"])
Settings.__doc__ = """Scalar fit settings.

Fields
------
method : int
    :data:`METHOD_SEGMENTED` or :data:`METHOD_FULL`.
b_min : float
    High-b threshold of the segmented step (and of the full fit's first start), ms/µm².
maxit : int
    Iteration limit of each Levenberg–Marquardt run (accepted plus rejected steps).
"""


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


def make_tables(b_values, bounds) -> Tables:
    """Voxel-independent inputs of the kernels.

    Parameters
    ----------
    b_values : (n_b,) float64
        b-values in s/mm², in the column order of the signal matrix.
    bounds : (4, 2) float64
        Bounds in :data:`fastivim.model.PARAM_NAMES` order, user units.

    Returns
    -------
    Tables
        Every field C-contiguous (see :class:`Tables`).
    """
    b = np.asarray(b_values, dtype=np.float64)
    bounds = np.ascontiguousarray(bounds, dtype=np.float64)
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
    return Tables(
        groups=groups.astype(np.int64).ravel(),
        bu=bu,
        w=w,
        bounds=bounds,
        dstar_grid=dstar_grid,
        d_grid=d_grid,
        ES=np.ascontiguousarray(ES),
        ED=np.ascontiguousarray(ED),
        GSS=GSS,
        PAIR=pair,
    )


def make_settings(method: int, b_threshold: float, maxit: int) -> Settings:
    """:class:`Settings` from a method code, the threshold in s/mm² and the iteration limit."""
    return Settings(method=int(method), b_min=float(b_threshold) * 1e-3, maxit=int(maxit))
