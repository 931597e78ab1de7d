"""Segmented (two-step) IVIM fit of one voxel.

Step 1: D and the intercept A from a weighted log-linear fit of the samples with b >= b_min,
where the pseudo-diffusion term has decayed. Step 2: with D (and A) held fixed, the perfusion
term ``B * exp(-b * D_star)`` (B = S0 * f) is fitted to what the tissue term leaves: a grid over
D_star, where B enters linearly, then a bounded Levenberg–Marquardt polish of (B, D_star).
S0 = A + B and f = B / S0, so D stays exactly the high-b estimate and f follows from the
intercept and S0 (cf. the OSIPI TF2.4 segmented fitters; Gurney-Champion et al., PLoS ONE 2018,
doi:10.1371/journal.pone.0194590).
"""

import math

from . import status as st
from ._jit import jit_voxel
from .voxel import KIND_PERFUSION, levenberg_marquardt, loglinear_fit

#: Relative margin that keeps D_star strictly above D.
DSTAR_MARGIN = 1e-6


@jit_voxel
def perfusion_start(ybar, bu, w, b_min, lo, hi, ES, GSS, dstar_grid, r, q, lo2, hi2):
    """Step 1 and the D_star grid of step 2: everything of the segmented fit but the polish.

    Writes the tissue residual ``r`` (n_u,) = ``ybar - A exp(-b D)``, the best grid start
    ``q[:2]`` = (B, D_star) of the perfusion term and its bounds ``lo2``, ``hi2`` (2,).

    Returns
    -------
    (code, A, D) : (int, float, float)
        ``st.OK`` when the start is usable, with the intercept and D (internal units).
    """
    nu = bu.shape[0]
    A, D, ok = loglinear_fit(bu, w, ybar, b_min)
    if not ok or not (math.isfinite(A) and math.isfinite(D)):
        return st.NUMERICAL_FAILURE, A, D
    D = min(max(D, lo[3]), hi[3])
    ds_lo = max(lo[2], D * (1.0 + DSTAR_MARGIN))
    if not ds_lo < hi[2]:
        return st.DSTAR_NOT_ABOVE_D, A, D
    # what the tissue compartment leaves for the perfusion compartment
    for u in range(nu):
        r[u] = ybar[u] - A * math.exp(-bu[u] * D)
    # B = S0 * f: its range follows from the f and S0 bounds at this intercept
    f_lo = lo[1]
    f_hi = hi[1]
    B_lo = max(A * f_lo / (1.0 - f_lo), lo[0] - A)
    B_hi = A * f_hi / (1.0 - f_hi) if f_hi < 1.0 else math.inf
    B_hi = min(B_hi, hi[0] - A)
    if B_hi < B_lo:
        B_hi = B_lo
    # coarse grid over D_star: B is linear, so each grid point costs a dot product
    best = -math.inf
    B0 = B_lo
    Ds0 = ds_lo
    for k in range(dstar_grid.shape[0]):
        if dstar_grid[k] < ds_lo or dstar_grid[k] > hi[2]:
            continue
        P = 0.0
        for u in range(nu):
            P += w[u] * ES[k, u] * r[u]
        B = min(max(P / GSS[k], B_lo), B_hi)
        reduction = 2.0 * B * P - B * B * GSS[k]
        if reduction > best:
            best = reduction
            B0 = B
            Ds0 = dstar_grid[k]
    q[0] = B0
    q[1] = Ds0
    lo2[0] = B_lo
    hi2[0] = B_hi
    lo2[1] = ds_lo
    hi2[1] = hi[2]
    return st.OK, A, D


@jit_voxel
def fit_segmented_voxel(ybar, bu, w, b_min, lo, hi, ES, GSS, dstar_grid, maxit, p, model, r,
                        work, mat, free, q, lo2, hi2):
    """Fit one voxel's scaled group means; write ``(S0, f, D_star, D)`` into ``p``.

    Parameters
    ----------
    ybar, bu, w : (n_u,) float64
        Scaled group means, b-values (ms/µm²) and group sizes.
    b_min : float
        Threshold (ms/µm²) of the high-b log-linear step.
    lo, hi : (4,) float64
        Internal bounds in parameter order.
    ES : (n_k, n_u) float64; GSS : (n_k,); dstar_grid : (n_k,)
        ``exp(-b * D_star_k)``, its weighted squared norm, and the grid (µm²/ms).
    maxit : int
        Iteration limit of the polish.
    p : (4,) output
        The estimate, internal units.
    model : (n_u,) output
        Fitted scaled means.
    r, work, mat, free, q, lo2, hi2
        Scratch.

    Returns
    -------
    int
        A status code; ``st.OK`` means ``p`` holds an estimate for :func:`finish_voxel`.
    """
    nu = bu.shape[0]
    code, A, D = perfusion_start(ybar, bu, w, b_min, lo, hi, ES, GSS, dstar_grid, r, q, lo2, hi2)
    if code != st.OK:
        return code
    ssr, converged = levenberg_marquardt(KIND_PERFUSION, 2, q, lo2, hi2, bu, w, r, maxit, work,
                                         mat, free)
    if not converged:
        return st.NO_CONVERGENCE
    S0 = A + q[0]
    if not S0 > 0.0:
        return st.NUMERICAL_FAILURE
    p[0] = S0
    p[1] = q[0] / S0
    p[2] = q[1]
    p[3] = D
    for u in range(nu):
        model[u] = ybar[u] - r[u] + work[u]  # tissue term + fitted perfusion term
    return st.OK
