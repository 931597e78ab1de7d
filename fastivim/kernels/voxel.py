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

#: Model kinds understood by :func:`evaluate` and :func:`levenberg_marquardt`.
KIND_FULL = 0  #: p = (S0, f, D_star, D); target = ybar
KIND_PERFUSION = 1  #: p = (B, D_star) with B = S0 * f; target = ybar - A * exp(-b * D)

#: Levenberg–Marquardt settings: start damping, give-up damping, relative tolerances on the
#: sum of squares (actual and predicted decrease) and on each parameter's step.
LM_LAMBDA0 = 1e-3
LM_LAMBDA_MAX = 1e16
LM_FTOL = 1e-9
LM_XTOL = 1e-8

#: Largest finite float32: maps are stored as float32, so larger values would become inf.
FLOAT32_MAX = 3.4028234663852886e38

#: Relative distance (of the bound interval) under which a parameter counts as pinned.
PIN_TOL = 1e-6


@jit_voxel
def group_means(Y, v, groups, w, ybar):
    """Collapse one voxel's samples to weighted group means; report whether they are usable.

    Parameters
    ----------
    Y : (n_vox, n_b) float array; v : int
        Raw samples, any float dtype, and the row of this voxel.
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
    for i in range(Y.shape[1]):
        yi = np.float64(Y[v, i])
        if not math.isfinite(yi):
            return math.nan
        ybar[groups[i]] += yi
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
def evaluate(kind, p, po, bu, w, t, work, mo, go, mat, h):
    """Model, weighted sum of squares and normal equations at ``p[po:po + n_p]``, in one pass.

    Writes into caller-owned scratch at offsets rather than through array views (a view costs
    an atomic reference-count update, which at this size is a measurable share of the work):
    ``work[mo:mo + n_u]`` gets the model ``m``, ``mat[h]`` (n_p, n_p) half the Hessian of the
    sum of squares (``J^T W J - sum w r d2m``) and ``work[go:go + n_p]`` the gradient half
    ``g = J^T W (t - m)``; returns ``sum w (t - m)**2``. The Jacobian is never stored: each
    b-value's row is folded into the sums while its exponentials are in registers.
    """
    nu = bu.shape[0]
    ssr = 0.0
    if kind == KIND_FULL:
        S0 = p[po]
        f = p[po + 1]
        Ds = p[po + 2]
        D = p[po + 3]
        a00 = a01 = a02 = a03 = a11 = a12 = a13 = a22 = a23 = a33 = 0.0
        g0 = g1 = g2 = g3 = 0.0
        for u in range(nu):
            e1 = math.exp(-bu[u] * Ds)
            e2 = math.exp(-bu[u] * D)
            mix = f * e1 + (1.0 - f) * e2
            mu = S0 * mix
            work[mo + u] = mu
            wu = w[u]
            r = t[u] - mu
            ssr += wu * r * r
            j0 = mix
            j1 = S0 * (e1 - e2)
            be1 = bu[u] * e1
            be2 = bu[u] * e2
            j2 = -S0 * f * be1
            j3 = -S0 * (1.0 - f) * be2
            wr = wu * r
            g0 += j0 * wr
            g1 += j1 * wr
            g2 += j2 * wr
            g3 += j3 * wr
            w0 = wu * j0
            w1 = wu * j1
            w2 = wu * j2
            # Gauss–Newton part J^T W J minus the residual-weighted second derivatives of the
            # model: the exact Hessian (halved), so Newton steps converge quadratically even
            # when the residual is large (noisy voxels), where plain Gauss–Newton crawls.
            a00 += w0 * j0
            a01 += w0 * j1 - wr * (e1 - e2)
            a02 += w0 * j2 + wr * f * be1
            a03 += w0 * j3 + wr * (1.0 - f) * be2
            a11 += w1 * j1
            a12 += w1 * j2 + wr * S0 * be1
            a13 += w1 * j3 - wr * S0 * be2
            a22 += w2 * j2 - wr * S0 * f * bu[u] * be1
            a23 += w2 * j3
            a33 += wu * j3 * j3 - wr * S0 * (1.0 - f) * bu[u] * be2
        mat[h, 0, 0] = a00
        mat[h, 0, 1] = mat[h, 1, 0] = a01
        mat[h, 0, 2] = mat[h, 2, 0] = a02
        mat[h, 0, 3] = mat[h, 3, 0] = a03
        mat[h, 1, 1] = a11
        mat[h, 1, 2] = mat[h, 2, 1] = a12
        mat[h, 1, 3] = mat[h, 3, 1] = a13
        mat[h, 2, 2] = a22
        mat[h, 2, 3] = mat[h, 3, 2] = a23
        mat[h, 3, 3] = a33
        work[go] = g0
        work[go + 1] = g1
        work[go + 2] = g2
        work[go + 3] = g3
    else:
        B = p[po]
        Ds = p[po + 1]
        a00 = a01 = a11 = 0.0
        g0 = g1 = 0.0
        for u in range(nu):
            e1 = math.exp(-bu[u] * Ds)
            mu = B * e1
            work[mo + u] = mu
            wu = w[u]
            r = t[u] - mu
            ssr += wu * r * r
            be1 = bu[u] * e1
            j1 = -B * be1
            wr = wu * r
            g0 += e1 * wr
            g1 += j1 * wr
            a00 += wu * e1 * e1
            a01 += wu * e1 * j1 + wr * be1  # exact Hessian, as above
            a11 += wu * j1 * j1 - wr * B * bu[u] * be1
        mat[h, 0, 0] = a00
        mat[h, 0, 1] = mat[h, 1, 0] = a01
        mat[h, 1, 1] = a11
        work[go] = g0
        work[go + 1] = g1
    return ssr


@jit_voxel
def solve_damped(n, mat, h, work, go, do, lam, free):
    """Solve ``(H + lam * |diag H|) delta = g`` over the free parameters by Cholesky.

    ``H`` is ``mat[h]``, ``g`` is ``work[go:go + n]``; ``delta`` goes to ``work[do:do + n]``
    and ``mat[2]`` is overwritten with the factor. Marquardt scaling (damping proportional to
    the diagonal, floored) keeps steps sensible for parameters of very different size; the
    absolute value matters because, with the exact Hessian, a diagonal entry can be negative
    far from the optimum and damping must still push it towards positive definiteness.
    Frozen parameters get ``delta = 0``.

    Returns
    -------
    bool
        False when the damped matrix is not positive definite (the caller raises ``lam``).
    """
    dmax = 0.0
    for i in range(n):
        if abs(mat[h, i, i]) > dmax:
            dmax = abs(mat[h, i, i])
    floor = 1e-12 * dmax + 1e-300
    for i in range(n):
        for j in range(n):
            if free[i] and free[j]:
                mat[2, i, j] = mat[h, i, j]
            else:
                mat[2, i, j] = 1.0 if i == j else 0.0
        if free[i]:
            mat[2, i, i] += lam * max(abs(mat[h, i, i]), floor)
            work[do + i] = work[go + i]
        else:
            work[do + i] = 0.0
    # in-place Cholesky mat[2] = L L^T (lower triangle)
    for j in range(n):
        s = mat[2, j, j]
        for k in range(j):
            s -= mat[2, j, k] * mat[2, j, k]
        if not s > 0.0:
            return False
        d = math.sqrt(s)
        mat[2, j, j] = d
        inv = 1.0 / d
        for i in range(j + 1, n):
            s = mat[2, i, j]
            for k in range(j):
                s -= mat[2, i, k] * mat[2, j, k]
            mat[2, i, j] = s * inv
    for i in range(n):  # forward substitution
        s = work[do + i]
        for k in range(i):
            s -= mat[2, i, k] * work[do + k]
        work[do + i] = s / mat[2, i, i]
    for i in range(n - 1, -1, -1):  # back substitution
        s = work[do + i]
        for k in range(i + 1, n):
            s -= mat[2, k, i] * work[do + k]
        work[do + i] = s / mat[2, i, i]
    for i in range(n):
        if not free[i]:
            work[do + i] = 0.0
    return True


@jit_voxel
def levenberg_marquardt(kind, n, p, lo, hi, bu, w, t, maxit, work, mat, free):
    """Bounded (projected, active-set) Levenberg–Marquardt on one voxel, in place on ``p``.

    Minimises ``sum_u w[u] * (t[u] - model(p)[u])**2`` subject to ``lo <= p <= hi``; for the
    full model also ``D_star > D``. Steps use the exact Hessian (see :func:`evaluate`), damped
    by Nielsen's gain-ratio rule. Parameters on a bound whose gradient points outward are
    frozen for the step (the KKT condition); the rest take the damped Newton step, clipped to
    the box.

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
    work : (2 * n_u + 16,) float64, mat : (3, 4, 4) float64, free : (4,) bool
        Scratch owned by the caller (allocated once per chunk of voxels). ``work`` holds two
        model buffers, two gradients, the trial point and the step; ``mat`` two Hessians and
        the Cholesky factor. Current and trial buffers swap roles by index, never by copy.

    Returns
    -------
    (ssr, converged) : (float, bool)
        On return ``work[:n_u]`` holds the model at the returned ``p``.
    """
    nu = bu.shape[0]
    PT = 2 * nu + 8  # trial point
    DL = 2 * nu + 12  # step
    cur = 0  # which of the two model/gradient/Hessian buffers is current

    for i in range(n):
        # a start outside the box (a bound the start's arithmetic did not know) would freeze
        # there: the active set treats a parameter beyond its bound as pinned
        p[i] = min(max(p[i], lo[i]), hi[i])
    tt = 0.0
    for u in range(nu):
        tt += w[u] * t[u] * t[u]
    ssr = evaluate(kind, p, 0, bu, w, t, work, 0, 2 * nu, mat, 0)
    lam = LM_LAMBDA0
    nu_up = 2.0  # Nielsen's growth factor for lambda after a rejected step
    converged = False
    for _ in range(maxit):
        if ssr <= 1e-28 * tt:
            converged = True  # exact fit to machine precision
            break
        go = 2 * nu + 4 * cur
        n_free = 0
        for i in range(n):
            at_lo = p[i] <= lo[i] and work[go + i] < 0.0
            at_hi = p[i] >= hi[i] and work[go + i] > 0.0
            free[i] = not (at_lo or at_hi)
            if free[i]:
                n_free += 1
        if n_free == 0:
            converged = True  # every parameter pinned with the gradient pointing outward
            break
        if not solve_damped(n, mat, cur, work, go, DL, lam, free):
            lam *= nu_up
            nu_up *= 2.0
            if lam > LM_LAMBDA_MAX:
                break
            continue
        step_small = True
        for i in range(n):
            v = min(max(p[i] + work[DL + i], lo[i]), hi[i])
            work[DL + i] = v - p[i]  # the step actually taken, after clipping to the box
            work[PT + i] = v
            if abs(v - p[i]) > LM_XTOL * (abs(p[i]) + LM_XTOL):
                step_small = False
        if step_small:
            converged = True
            break
        # reduction the quadratic model predicts for this (clipped) step: 2 d.g - d.H.d
        pred = 0.0
        for i in range(n):
            q = 0.0
            for j in range(n):
                q += mat[cur, i, j] * work[DL + j]
            pred += work[DL + i] * (2.0 * work[go + i] - q)
        if not pred > 0.0:
            # the exact Hessian is indefinite along this step: the quadratic model cannot be
            # trusted, so damp harder (towards gradient descent) instead of stopping
            lam *= nu_up
            nu_up *= 2.0
            if lam > LM_LAMBDA_MAX:
                break
            continue
        if pred <= LM_FTOL * ssr and lam <= 1.0:
            # a nearly undamped Newton step would gain nothing worth having: converged
            # (with heavy damping a small prediction only means a short step, so go on)
            converged = True
            break
        if kind == KIND_FULL and not work[PT + 2] > work[PT + 3]:
            lam *= nu_up  # the step would cross D_star = D: shorten it
            nu_up *= 2.0
            if lam > LM_LAMBDA_MAX:
                converged = True
                break
            continue
        nxt = 1 - cur
        ssr_try = evaluate(kind, work, PT, bu, w, t, work, nxt * nu, 2 * nu + 4 * nxt, mat, nxt)
        rho = (ssr - ssr_try) / pred
        if rho > 1e-4:
            decrease = ssr - ssr_try
            for i in range(n):
                p[i] = work[PT + i]
            cur = nxt  # the trial's model, gradient and Hessian become current
            ssr = ssr_try
            # Nielsen (1999): relax damping when the quadratic model predicted well
            q = 2.0 * rho - 1.0
            lam *= max(1.0 / 3.0, 1.0 - q * q * q)
            nu_up = 2.0
            if decrease <= LM_FTOL * ssr:
                converged = True
                break
        else:
            lam *= nu_up
            nu_up *= 2.0
            if lam > LM_LAMBDA_MAX:
                converged = True  # no descent along any damped direction: stationary
                break
    if cur == 1:
        for u in range(nu):
            work[u] = work[nu + u]  # leave the final model in work[:n_u] for the caller
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
def finish_voxel(Y, v, groups, model, p, scale, lo, hi, out):
    """Write row ``v`` of ``out`` (n_vox, 6) for voxel row ``v`` of ``Y``; return its status.

    ``p`` holds ``(S0, f, D_star, D)`` in internal units (S0 / scale, D in µm²/ms) and ``model``
    (n_u,) the fitted scaled signal per unique b-value; ``lo``/``hi`` are the internal bounds.
    ``out[v]`` receives S0, f, D_star, D (mm²/s), R² and RMSE, the last two over every raw
    sample (input units).
    """
    for i in range(4):
        if not math.isfinite(p[i]):
            return fail_voxel(out, v, st.NUMERICAL_FAILURE)
        # the solvers keep p inside the box; S0 = A + B and f = B / S0 can still round an
        # ulp past a bound, and a reported value must never lie outside it
        p[i] = min(max(p[i], lo[i]), hi[i])
    if not abs(p[0] * scale) < FLOAT32_MAX:
        return fail_voxel(out, v, st.NUMERICAL_FAILURE)  # S0 would be inf in a float32 map
    nb = Y.shape[1]
    mean = 0.0
    for i in range(nb):
        mean += np.float64(Y[v, i])
    mean /= nb
    ssr = 0.0
    sst = 0.0
    for i in range(nb):
        yi = np.float64(Y[v, i])
        r = yi - scale * model[groups[i]]
        ssr += r * r
        d = yi - mean
        sst += d * d
    out[v, 0] = p[0] * scale
    out[v, 1] = p[1]
    out[v, 2] = p[2] * 1e-3
    out[v, 3] = p[3] * 1e-3
    out[v, 4] = 1.0 - ssr / sst if sst > 0.0 else math.nan
    out[v, 5] = math.sqrt(ssr / nb)
    if not p[2] - p[3] > PIN_TOL * (hi[2] - lo[2]):
        return st.DSTAR_NOT_ABOVE_D
    s0_span = hi[0] - lo[0] if math.isfinite(hi[0]) else 1.0
    for k in range(4):
        span = s0_span if k == 0 else hi[k] - lo[k]
        if pinned(p[k], lo[k], hi[k], span):
            return st.AT_BOUND
    return st.OK


@jit_voxel
def fail_voxel(out, v, code):
    """Fill row ``v`` of ``out`` with NaN and return ``code``."""
    for k in range(out.shape[1]):
        out[v, k] = math.nan
    return code


@jit_voxel
def fail_voxel_sd(out, sd, v, code):
    """Fill row ``v`` of ``out`` and of the uncertainty rows ``sd`` with NaN; return ``code``."""
    for k in range(sd.shape[1]):
        sd[v, k] = math.nan
    return fail_voxel(out, v, code)


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
