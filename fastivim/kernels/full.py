"""Full (simultaneous) IVIM fit of one voxel: all four parameters by bounded Levenberg–Marquardt.

S0 and f enter the model linearly (as c1 = S0 * f and c2 = S0 * (1 - f)), so for each (D, D_star)
pair of a coarse log-spaced grid the best (S0, f) is a 2×2 least-squares solve on precomputed,
voxel-independent Gram matrices (variable projection, Golub & Pereyra 1973,
doi:10.1137/0710036). The best grid pair seeds a bounded LM on all four parameters, which then
converges in a few iterations from inside the right basin, without the multi-start that
general-purpose optimisers need.
"""

import math

from . import status as st
from ._jit import jit_voxel
from .voxel import KIND_FULL, levenberg_marquardt


@jit_voxel
def _best_on_f_edge(fb, PS, PD, GSS, GDD, GSD, S0_lo, S0_hi):
    """Best S0 with f fixed at ``fb`` for one grid pair: returns (reduction, S0)."""
    Gv = fb * fb * GSS + 2.0 * fb * (1.0 - fb) * GSD + (1.0 - fb) * (1.0 - fb) * GDD
    Pv = fb * PS + (1.0 - fb) * PD
    S0 = min(max(Pv / Gv, S0_lo), S0_hi)
    return 2.0 * S0 * Pv - S0 * S0 * Gv, S0


@jit_voxel
def grid_start(ybar, w, lo, hi, ES, ED, GSS, GDD, GSD, dstar_grid, d_grid, PS, PD, p):
    """Best (S0, f, D_star, D) over the (D, D_star) grid, with S0 and f solved exactly.

    ``ES`` (n_k, n_u) and ``ED`` (n_j, n_u) hold ``exp(-b * D_star_k)`` and ``exp(-b * D_j)``;
    ``GSS`` (n_k,), ``GDD`` (n_j,) and ``GSD`` (n_j, n_k) their weighted inner products.
    Writes the start into ``p``; returns False when no grid pair is admissible.
    """
    nu = ybar.shape[0]
    for k in range(dstar_grid.shape[0]):
        s = 0.0
        for u in range(nu):
            s += w[u] * ES[k, u] * ybar[u]
        PS[k] = s
    for j in range(d_grid.shape[0]):
        s = 0.0
        for u in range(nu):
            s += w[u] * ED[j, u] * ybar[u]
        PD[j] = s
    f_lo = lo[1]
    f_hi = hi[1]
    best = -math.inf
    found = False
    for j in range(d_grid.shape[0]):
        for k in range(dstar_grid.shape[0]):
            if not dstar_grid[k] > d_grid[j]:
                continue
            gdd = GDD[j]
            gss = GSS[k]
            gsd = GSD[j, k]
            det = gss * gdd - gsd * gsd
            admissible = False
            if det > 1e-14 * gss * gdd:
                c1 = (gdd * PS[k] - gsd * PD[j]) / det
                c2 = (gss * PD[j] - gsd * PS[k]) / det
                S0 = c1 + c2
                if S0 > 0.0:
                    f = c1 / S0
                    if f_lo <= f <= f_hi and lo[0] <= S0 <= hi[0]:
                        admissible = True
                        reduction = c1 * PS[k] + c2 * PD[j]
            if not admissible:
                # the unconstrained optimum leaves the cone: the best lies on an f edge
                red_lo, S0_lo_edge = _best_on_f_edge(f_lo, PS[k], PD[j], gss, gdd, gsd, lo[0],
                                                     hi[0])
                red_hi, S0_hi_edge = _best_on_f_edge(f_hi, PS[k], PD[j], gss, gdd, gsd, lo[0],
                                                     hi[0])
                if red_lo >= red_hi:
                    reduction = red_lo
                    S0 = S0_lo_edge
                    f = f_lo
                else:
                    reduction = red_hi
                    S0 = S0_hi_edge
                    f = f_hi
            if reduction > best:
                best = reduction
                found = True
                p[0] = S0
                p[1] = f
                p[2] = dstar_grid[k]
                p[3] = d_grid[j]
    return found


@jit_voxel
def fit_full_voxel(ybar, bu, w, lo, hi, ES, ED, GSS, GDD, GSD, dstar_grid, d_grid, maxit, p,
                   PS, PD, vec, mat, jac, free):
    """Fit one voxel's scaled group means with all four parameters free; result in ``p``.

    Returns a status code; ``st.OK`` means ``p`` holds an estimate for :func:`finish_voxel`.
    """
    if not grid_start(ybar, w, lo, hi, ES, ED, GSS, GDD, GSD, dstar_grid, d_grid, PS, PD, p):
        return st.DSTAR_NOT_ABOVE_D
    ssr, converged = levenberg_marquardt(KIND_FULL, 4, p, lo, hi, bu, w, ybar, maxit, vec, mat,
                                         jac, free)
    if not converged:
        return st.NO_CONVERGENCE
    return st.OK
