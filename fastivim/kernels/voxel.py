"""One-voxel building blocks shared by the solvers (compiled, no allocation, never raise).

Internal units keep the numbers near 1 so that the normal equations are well conditioned:

* b in ms/µm² (``b / 1000``), so D and D_star are in µm²/ms (``D * 1000``);
* the signal is divided by its largest group mean (``scale``), so S0 is near 1.

Repeated b-values (several diffusion directions) are collapsed to group means ``ybar`` with
weights ``w`` (the group sizes). The weighted least-squares problem on the means has exactly the
same minimiser as the problem on all samples, at a fraction of the exp() calls.

Parameter vectors use :data:`fastivim.model.PARAM_NAMES` order: ``(S0, f, D_star, D)``.
"""

import math

import numpy as np

from . import status as st
from ._jit import jit_voxel

#: Model kinds understood by :func:`model_and_jacobian` and :func:`levenberg_marquardt`.
KIND_FULL = 0  #: p = (S0, f, D_star, D); target = ybar
KIND_PERFUSION = 1  #: p = (B, D_star) with B = S0 * f; target = ybar - A * exp(-b * D)

#: Relative distance (of the bound interval) under which a parameter counts as pinned.
PIN_TOL = 1e-6


@jit_voxel
def group_means(y, groups, w, ybar):
    """Collapse one voxel's samples to weighted group means; report whether they are usable.

    Parameters
    ----------
    y : (n_b,) float array
        Raw samples of one voxel, any float dtype.
    groups : (n_b,) int64
        Index of each sample's unique b-value.
    w : (n_u,) float64
        Number of samples per unique b-value.
    ybar : (n_u,) float64, output
        Mean signal per unique b-value, divided by ``scale``.

    Returns
    -------
    scale : float
        Largest group mean (the signal unit), or NaN when the voxel is unusable.
    """
    nu = ybar.shape[0]
    for u in range(nu):
        ybar[u] = 0.0
    for i in range(y.shape[0]):
        v = np.float64(y[i])
        if not math.isfinite(v):
            return math.nan
        ybar[groups[i]] += v
    scale = -math.inf
    for u in range(nu):
        ybar[u] /= w[u]
        if ybar[u] > scale:
            scale = ybar[u]
    if not scale > 0.0:
        return math.nan
    for u in range(nu):
        ybar[u] /= scale
    return scale


@jit_voxel
def loglinear_fit(bu, w, ybar, b_min):
    """Weighted log-linear fit ``ln S = ln A - b D`` over the samples with ``b >= b_min``.

    Weights are ``w * S**2``: the variance of ``ln S`` is about ``sigma**2 / S**2``.
    Non-positive means are skipped (their log is undefined).

    Returns
    -------
    (A, D, ok) : (float, float, bool)
        Intercept (scaled signal units), slope as D (µm²/ms), and whether at least two distinct
        b-values with positive signal entered the fit.
    """
    s0 = 0.0
    sx = 0.0
    sy = 0.0
    sxx = 0.0
    sxy = 0.0
    n_used = 0
    b_first = -1.0
    distinct = False
    for u in range(bu.shape[0]):
        if bu[u] >= b_min and ybar[u] > 0.0:
            om = w[u] * ybar[u] * ybar[u]
            x = bu[u]
            ly = math.log(ybar[u])
            s0 += om
            sx += om * x
            sy += om * ly
            sxx += om * x * x
            sxy += om * x * ly
            if n_used == 0:
                b_first = x
            elif x != b_first:
                distinct = True
            n_used += 1
    if not distinct:
        return math.nan, math.nan, False
    # centred form of the normal equations: avoids cancellation in s0*sxx - sx*sx
    xm = sx / s0
    ym = sy / s0
    cxx = sxx / s0 - xm * xm
    cxy = sxy / s0 - xm * ym
    if not cxx > 0.0:
        return math.nan, math.nan, False
    slope = cxy / cxx
    return math.exp(ym - slope * xm), -slope, True


@jit_voxel
def model_and_jacobian(kind, p, bu, m, J):
    """Model values ``m`` (n_u,) and Jacobian ``J`` (n_u, n_p) at ``p`` for a model kind."""
    nu = bu.shape[0]
    if kind == KIND_FULL:
        S0 = p[0]
        f = p[1]
        Ds = p[2]
        D = p[3]
        for u in range(nu):
            e1 = math.exp(-bu[u] * Ds)
            e2 = math.exp(-bu[u] * D)
            mix = f * e1 + (1.0 - f) * e2
            m[u] = S0 * mix
            J[u, 0] = mix
            J[u, 1] = S0 * (e1 - e2)
            J[u, 2] = -S0 * f * bu[u] * e1
            J[u, 3] = -S0 * (1.0 - f) * bu[u] * e2
    else:
        B = p[0]
        Ds = p[1]
        for u in range(nu):
            e1 = math.exp(-bu[u] * Ds)
            m[u] = B * e1
            J[u, 0] = e1
            J[u, 1] = -B * bu[u] * e1


@jit_voxel
def weighted_ssr(w, t, m):
    """Sum over groups of ``w * (t - m)**2``."""
    s = 0.0
    for u in range(t.shape[0]):
        r = t[u] - m[u]
        s += w[u] * r * r
    return s


@jit_voxel
def solve_damped(n, JtJ, g, lam, free, A, delta):
    """Solve ``(JtJ + lam * diag) delta = g`` over the free parameters by Cholesky.

    Marquardt scaling (damping proportional to the diagonal, floored) keeps steps sensible for
    parameters of very different size. Frozen parameters get ``delta = 0``.

    Returns
    -------
    bool
        False when the damped matrix is not positive definite (the caller raises ``lam``).
    """
    dmax = 0.0
    for i in range(n):
        if JtJ[i, i] > dmax:
            dmax = JtJ[i, i]
    floor = 1e-12 * dmax + 1e-300
    for i in range(n):
        for j in range(n):
            if free[i] and free[j]:
                A[i, j] = JtJ[i, j]
            else:
                A[i, j] = 1.0 if i == j else 0.0
        if free[i]:
            A[i, i] += lam * max(JtJ[i, i], floor)
            delta[i] = g[i]
        else:
            delta[i] = 0.0
    # in-place Cholesky A = L L^T (lower triangle)
    for j in range(n):
        s = A[j, j]
        for k in range(j):
            s -= A[j, k] * A[j, k]
        if not s > 0.0:
            return False
        A[j, j] = math.sqrt(s)
        for i in range(j + 1, n):
            s = A[i, j]
            for k in range(j):
                s -= A[i, k] * A[j, k]
            A[i, j] = s / A[j, j]
    for i in range(n):  # forward substitution
        s = delta[i]
        for k in range(i):
            s -= A[i, k] * delta[k]
        delta[i] = s / A[i, i]
    for i in range(n - 1, -1, -1):  # back substitution
        s = delta[i]
        for k in range(i + 1, n):
            s -= A[k, i] * delta[k]
        delta[i] = s / A[i, i]
    for i in range(n):
        if not free[i]:
            delta[i] = 0.0
    return True


@jit_voxel
def levenberg_marquardt(kind, n, p, lo, hi, bu, w, t, maxit, vec, mat, jac, free):
    """Bounded (projected, active-set) Levenberg–Marquardt on one voxel, in place on ``p``.

    Minimises ``sum_u w[u] * (t[u] - model(p)[u])**2`` subject to ``lo <= p <= hi``; for the
    full model also ``D_star > D``. Parameters sitting on a bound whose gradient points outward
    are frozen for the step (the KKT condition); the rest take a damped Gauss–Newton step that
    is then clipped to the box.

    Parameters
    ----------
    kind : int
        :data:`KIND_FULL` or :data:`KIND_PERFUSION`.
    n : int
        Number of parameters (4 or 2).
    p, lo, hi : (>= n,) float64
        Start point (overwritten with the solution) and bounds, internal units.
    bu, w, t : (n_u,) float64
        b-values (ms/µm²), weights, target.
    maxit : int
        Maximum number of iterations (accepted plus rejected steps).
    vec : (2 * n_u + 12,) float64, mat : (2, 4, 4) float64, jac : (2, n_u, 4) float64,
    free : (4,) bool
        Scratch space owned by the caller (allocated once per chunk of voxels).

    Returns
    -------
    (ssr, converged) : (float, bool)
    """
    nu = bu.shape[0]
    m = vec[0:nu]
    m_try = vec[nu : 2 * nu]
    p_try = vec[2 * nu : 2 * nu + 4]
    g = vec[2 * nu + 4 : 2 * nu + 8]
    delta = vec[2 * nu + 8 : 2 * nu + 12]
    JtJ = mat[0]
    A = mat[1]
    J = jac[0]
    J_try = jac[1]

    tt = 0.0
    for u in range(nu):
        tt += w[u] * t[u] * t[u]
    model_and_jacobian(kind, p, bu, m, J)
    ssr = weighted_ssr(w, t, m)
    lam = 1e-3
    converged = False
    for _ in range(maxit):
        if ssr <= 1e-28 * tt:
            converged = True
            break
        # normal equations on the weighted residual
        for i in range(n):
            gi = 0.0
            for u in range(nu):
                gi += w[u] * J[u, i] * (t[u] - m[u])
            g[i] = gi
            for j in range(i, n):
                s = 0.0
                for u in range(nu):
                    s += w[u] * J[u, i] * J[u, j]
                JtJ[i, j] = s
                JtJ[j, i] = s
        n_free = 0
        for i in range(n):
            at_lo = p[i] <= lo[i] and g[i] < 0.0
            at_hi = p[i] >= hi[i] and g[i] > 0.0
            free[i] = not (at_lo or at_hi)
            if free[i]:
                n_free += 1
        if n_free == 0:
            converged = True
            break
        if not solve_damped(n, JtJ, g, lam, free, A, delta):
            lam *= 10.0
            if lam > 1e16:
                break
            continue
        step_small = True
        for i in range(n):
            v = p[i] + delta[i]
            if v < lo[i]:
                v = lo[i]
            elif v > hi[i]:
                v = hi[i]
            p_try[i] = v
            if abs(v - p[i]) > 1e-10 * (abs(p[i]) + 1e-10):
                step_small = False
        if step_small:
            converged = True
            break
        if kind == KIND_FULL and not p_try[2] > p_try[3]:
            lam *= 10.0  # the step would cross D_star = D: shorten it
            if lam > 1e16:
                converged = True
                break
            continue
        model_and_jacobian(kind, p_try, bu, m_try, J_try)
        ssr_try = weighted_ssr(w, t, m_try)
        if ssr_try < ssr:
            decrease = ssr - ssr_try
            for i in range(n):
                p[i] = p_try[i]
            for u in range(nu):
                m[u] = m_try[u]
                for i in range(n):
                    J[u, i] = J_try[u, i]
            ssr = ssr_try
            lam = max(lam * 0.1, 1e-12)
            if decrease <= 1e-13 * ssr:
                converged = True
                break
        else:
            lam *= 10.0
            if lam > 1e16:
                # no descent left along any damped direction: a stationary point
                converged = True
                break
    return ssr, converged


@jit_voxel
def pinned(v, lo, hi, span):
    """Whether ``v`` sits within ``PIN_TOL * span`` of ``lo`` or a finite ``hi``."""
    if v - lo <= PIN_TOL * span:
        return True
    if math.isfinite(hi) and hi - v <= PIN_TOL * span:
        return True
    return False


@jit_voxel
def finish_voxel(y, groups, bu, p, scale, lo, hi, dstar_span, out_row):
    """Write one voxel's outputs and return its status.

    ``p`` holds ``(S0, f, D_star, D)`` in internal units (S0 / scale, D in µm²/ms); ``lo``/``hi``
    are the internal bounds. ``out_row`` (6,) receives S0, f, D_star, D (mm²/s), R² and RMSE,
    computed over every raw sample.
    """
    S0 = p[0]
    f = p[1]
    Ds = p[2]
    D = p[3]
    for i in range(4):
        if not math.isfinite(p[i]):
            return fail_voxel(out_row, st.NUMERICAL_FAILURE)
    ssr = 0.0
    mean = 0.0
    nb = y.shape[0]
    for i in range(nb):
        mean += np.float64(y[i])
    mean /= nb
    sst = 0.0
    for i in range(nb):
        bb = bu[groups[i]]
        model = scale * S0 * (f * math.exp(-bb * Ds) + (1.0 - f) * math.exp(-bb * D))
        r = np.float64(y[i]) - model
        ssr += r * r
        d = np.float64(y[i]) - mean
        sst += d * d
    out_row[0] = S0 * scale
    out_row[1] = f
    out_row[2] = Ds * 1e-3
    out_row[3] = D * 1e-3
    out_row[4] = 1.0 - ssr / sst if sst > 0.0 else math.nan
    out_row[5] = math.sqrt(ssr / nb)
    if not Ds - D > PIN_TOL * dstar_span:
        return st.DSTAR_NOT_ABOVE_D
    if (
        pinned(S0, lo[0], hi[0], max(hi[0] - lo[0], 1.0) if math.isfinite(hi[0]) else 1.0)
        or pinned(f, lo[1], hi[1], hi[1] - lo[1])
        or pinned(Ds, lo[2], hi[2], hi[2] - lo[2])
        or pinned(D, lo[3], hi[3], hi[3] - lo[3])
    ):
        return st.AT_BOUND
    return st.OK


@jit_voxel
def fail_voxel(out_row, code):
    """Fill one voxel's outputs with NaN and return ``code``."""
    for k in range(out_row.shape[0]):
        out_row[k] = math.nan
    return code


@jit_voxel
def internal_bounds(bounds, scale, lo, hi):
    """Convert ``bounds`` (4, 2) in user units to internal units for one voxel."""
    lo[0] = bounds[0, 0] / scale
    hi[0] = bounds[0, 1] / scale
    lo[1] = bounds[1, 0]
    hi[1] = bounds[1, 1]
    for k in (2, 3):
        lo[k] = bounds[k, 0] * 1e3
        hi[k] = bounds[k, 1] * 1e3
