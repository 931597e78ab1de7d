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
def grid_start(ybar, w, lo, hi, ES, ED, PAIR, dstar_grid, d_grid, PS, PD, p):
    """Best (S0, f, D_star, D) over the (D, D_star) grid, with S0 and f solved exactly.

    ``ES`` (n_k, n_u) and ``ED`` (n_j, n_u) hold ``exp(-b * D_star_k)`` and ``exp(-b * D_j)``.
    ``PAIR`` (5, n_j, n_k) holds, per grid pair, the voxel-independent factors of the 2×2
    least-squares solve (inverse Gram matrix entries) and of the two f-edge solves (inverse
    squared norms), from :func:`fastivim.kernels.driver.make_tables`: the search costs a few
    multiply-adds per pair and no division. Writes the start into ``p``; returns False when no
    grid pair has D_star > D.
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
        pd = PD[j]
        for k in range(dstar_grid.shape[0]):
            if not dstar_grid[k] > d_grid[j]:
                continue
            ps = PS[k]
            # unconstrained (c1, c2) = (S0 f, S0 (1 - f)); NaN factors mark singular pairs
            c1 = PAIR[0, j, k] * ps - PAIR[1, j, k] * pd
            c2 = PAIR[2, j, k] * pd - PAIR[1, j, k] * ps
            S0 = c1 + c2
            if S0 > 0.0 and c1 >= f_lo * S0 and c1 <= f_hi * S0 and lo[0] <= S0 <= hi[0]:
                reduction = c1 * ps + c2 * pd
                f = c1 / S0
            else:
                # the unconstrained optimum leaves the feasible cone: the best is on an f edge
                pv = f_lo * ps + (1.0 - f_lo) * pd
                S0 = min(max(pv * PAIR[3, j, k], lo[0]), hi[0])
                reduction = 2.0 * S0 * pv - S0 * S0 / PAIR[3, j, k]
                f = f_lo
                pv = f_hi * ps + (1.0 - f_hi) * pd
                S0_hi = min(max(pv * PAIR[4, j, k], lo[0]), hi[0])
                red_hi = 2.0 * S0_hi * pv - S0_hi * S0_hi / PAIR[4, j, k]
                if red_hi > reduction:
                    reduction = red_hi
                    S0 = S0_hi
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
def fit_full_voxel(ybar, bu, w, lo, hi, ES, ED, PAIR, dstar_grid, d_grid, maxit, p,
                   model, PS, PD, work, mat, free):
    """Fit one voxel's scaled group means with all four parameters free.

    Writes the estimate into ``p`` (4,) and the fitted means into ``model`` (n_u,).

    Returns a status code; ``st.OK`` means ``p`` holds an estimate for :func:`finish_voxel`.
    """
    if not grid_start(ybar, w, lo, hi, ES, ED, PAIR, dstar_grid, d_grid, PS, PD, p):
        return st.DSTAR_NOT_ABOVE_D
    ssr, converged = levenberg_marquardt(KIND_FULL, 4, p, lo, hi, bu, w, ybar, maxit, work, mat,
                                         free)
    if not converged:
        return st.NO_CONVERGENCE
    for u in range(ybar.shape[0]):
        model[u] = work[u]
    return st.OK
