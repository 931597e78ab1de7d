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

#: Newton polish of the D_star profile: iteration limit and relative step tolerance.
PROFILE_MAXIT = 30
PROFILE_XTOL = 1e-10


@jit_voxel
def feasible_intercept(A, lo, hi):
    """The tissue intercept ``A = S0 * (1 - f)`` moved into the range the bounds allow.

    With S0 in ``[lo[0], hi[0]]`` and f in ``[lo[1], hi[1]]``, ``S0 * (1 - f)`` spans exactly
    ``[lo[0] * (1 - hi[1]), hi[0] * (1 - lo[1])]``. An intercept outside it (a high-b fit that
    alone exceeds an S0 bound, or a noise-driven negative one) admits no perfusion term B that
    keeps both S0 = A + B and f = B / S0 inside their bounds, so it is moved to the nearest end;
    the fit then ends with S0 and f on their bounds (status ``AT_BOUND``).
    """
    A_lo = lo[0] * (1.0 - hi[1])
    A_hi = hi[0] * (1.0 - lo[1]) if math.isfinite(hi[0]) else math.inf
    return min(max(A, A_lo), A_hi)


@jit_voxel
def perfusion_range(A, lo, hi):
    """Bounds ``(B_lo, B_hi)`` of the perfusion amplitude B = S0 * f at intercept ``A``.

    ``f = B / (A + B)`` inside ``[lo[1], hi[1]]`` and ``S0 = A + B`` inside ``[lo[0], hi[0]]``;
    ``A`` must come from :func:`feasible_intercept`, so the range is not empty (up to
    rounding, which collapses it onto ``B_lo``).
    """
    f_lo = lo[1]
    f_hi = hi[1]
    # f >= f_lo  <=>  B (1 - f_lo) >= A f_lo; for f_lo = 1 the intercept is 0 and any B >= 0 goes
    B_lo = max(A * f_lo / (1.0 - f_lo) if f_lo < 1.0 else 0.0, lo[0] - A)
    B_hi = A * f_hi / (1.0 - f_hi) if f_hi < 1.0 else math.inf
    B_hi = min(B_hi, hi[0] - A)
    if not B_lo <= B_hi:
        B_hi = B_lo
    return B_lo, B_hi


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
    A = feasible_intercept(A, lo, hi)
    # what the tissue compartment leaves for the perfusion compartment
    for u in range(nu):
        r[u] = ybar[u] - A * math.exp(-bu[u] * D)
    B_lo, B_hi = perfusion_range(A, lo, hi)
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
def profile_newton(r, bu, w, dstar_grid, q, lo2, hi2, work):
    """Polish D_star by safeguarded Newton on the variable-projection profile; B in closed form.

    With D and A fixed, ``sum w (r - B e)**2`` (``e = exp(-b D_star)``) is minimised over B
    by ``B = P / G`` (``P = sum w e r``, ``G = sum w e**2``), leaving the one-dimensional
    problem: maximise ``h(D_star) = P**2 / G``. Its first and second derivatives come from
    the same exponentials, so each Newton step costs one pass over the b-values, and it
    converges in a few steps inside the bracket of the grid neighbours of the start ``q[1]``.

    On success writes ``q`` = (B, D_star) and the perfusion term ``B e`` into
    ``work[:n_u]``. Returns False (``q`` untouched) when the optimum is not interior: B outside
    ``[lo2[0], hi2[0]]``, D_star at the edge of ``[lo2[1], hi2[1]]`` or of the bracket, or no
    convergence; the caller then runs the bounded LM.
    """
    nu = bu.shape[0]
    x = q[1]
    a = lo2[1]
    b = hi2[1]
    for k in range(dstar_grid.shape[0]):  # bracket: the grid neighbours of the start
        g = dstar_grid[k]
        if g < x and g > a:
            a = g
        if g > x and g < b:
            b = g
    bracket_lo = a
    bracket_hi = b
    converged = False
    P = 0.0
    G = 0.0
    for _ in range(PROFILE_MAXIT):
        P = 0.0
        G = 0.0
        P1 = 0.0
        G1 = 0.0
        P2 = 0.0
        G2 = 0.0
        for u in range(nu):
            bb = bu[u]
            e = math.exp(-bb * x)
            we = w[u] * e
            P += we * r[u]
            G += we * e
            P1 -= we * bb * r[u]
            G1 -= 2.0 * we * bb * e
            P2 += we * bb * bb * r[u]
            G2 += 4.0 * we * bb * bb * e
        if not (G > 0.0 and P > 0.0):
            return False  # no positive perfusion term here: B is at (or below) its bound
        num = 2.0 * P * P1 * G - P * P * G1
        dh = num / (G * G)
        d2h = ((2.0 * P1 * P1 * G + 2.0 * P * P2 * G - P * P * G2) * G - 2.0 * G1 * num) / (
            G * G * G)
        if dh > 0.0:
            a = max(a, x)
        else:
            b = min(b, x)
        if d2h < 0.0:
            xn = x - dh / d2h
        else:
            xn = b if dh > 0.0 else a  # not concave here: head uphill
        if not a < xn < b:
            xn = 0.5 * (a + b)
        if abs(xn - x) <= PROFILE_XTOL * x:
            x = xn
            converged = True
            break
        x = xn
    if not converged:
        return False
    span = bracket_hi - bracket_lo
    if x - bracket_lo <= 1e-6 * span or bracket_hi - x <= 1e-6 * span:
        return False  # the maximum sits on the bracket's edge, not inside it
    P = 0.0
    G = 0.0
    for u in range(nu):
        e = math.exp(-bu[u] * x)
        work[u] = e
        P += w[u] * e * r[u]
        G += w[u] * e * e
    B = P / G
    if not lo2[0] < B < hi2[0]:
        return False
    for u in range(nu):
        work[u] *= B
    q[0] = B
    q[1] = x
    return True


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
    if not profile_newton(r, bu, w, dstar_grid, q, lo2, hi2, work):
        # the optimum is on a bound (of B or D_star) or the profile misbehaves: the bounded
        # 2-parameter Levenberg–Marquardt handles every case
        ssr, converged = levenberg_marquardt(KIND_PERFUSION, 2, q, lo2, hi2, bu, w, r, maxit,
                                             work, mat, free)
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
