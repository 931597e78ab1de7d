"""The simplified IVIM model (S0, D, f) for protocols with too few b-values to fit D_star.

    ``S(0) = S0``;  ``S(b) = S0 * (1 - f) * exp(-b * D)`` for ``b >= b_threshold``

(osipy's ``simplified`` model; the "sIVIM" of Jalnefjord et al., MAGMA 2018,
doi:10.1007/s10334-018-0697-5). The perfusion signal is taken to have decayed by
``b_threshold`` and b-values between 0 and ``b_threshold`` are not described by the model, so
they are not used. Least squares then separates: S0 is the mean of the b = 0 samples, and the
tissue intercept ``A = S0 (1 - f)`` and D fit the high-b samples (a weighted log-linear start,
then Gauss–Newton on ``A exp(-b D)``); ``f = 1 - A / S0``.

Internal units: b in ms/µm², D in µm²/ms; signals divided by the voxel's b = 0 mean.
"""

import math

import numpy as np
from numba import prange

from . import status as st
from ._jit import jit_parallel, jit_voxel
from .voxel import fail_voxel_sd

#: Gauss–Newton limits on (A, D): iterations and relative step tolerance.
GN_MAXIT = 50
GN_XTOL = 1e-12

#: Relative distance (of the bound interval) under which a parameter counts as pinned (as in
#: :mod:`fastivim.kernels.voxel`).
PIN_TOL = 1e-6


@jit_voxel
def _high_b_fit(ybar, bu, w, high, d_lo, d_hi):
    """Least-squares ``A exp(-b D)`` over the unique b-values flagged ``high``.

    Returns ``(A, D, ssr, converged)``; ``A`` is NaN when fewer than two distinct high
    b-values have positive signal (no log-linear start).
    """
    nu = bu.shape[0]
    s0 = sx = sy = sxx = sxy = 0.0
    n_pos = 0
    for u in range(nu):
        if high[u] and ybar[u] > 0.0:
            om = w[u] * ybar[u] * ybar[u]  # var(ln y) ~ sigma² / y²
            ly = math.log(ybar[u])
            s0 += om
            sx += om * bu[u]
            sy += om * ly
            sxx += om * bu[u] * bu[u]
            sxy += om * bu[u] * ly
            n_pos += 1
    if n_pos < 2:
        return math.nan, math.nan, math.nan, False
    xm = sx / s0
    cxx = sxx / s0 - xm * xm
    if not cxx > 0.0:
        return math.nan, math.nan, math.nan, False
    D = -(sxy / s0 - xm * sy / s0) / cxx
    D = min(max(D, d_lo), d_hi)
    # for fixed D the best A is linear: A = <y, e> / <e, e>
    converged = False
    for _ in range(GN_MAXIT):
        pe = ee = pbe = ebe = bbe = 0.0
        for u in range(nu):
            if high[u]:
                e = math.exp(-bu[u] * D)
                pe += w[u] * ybar[u] * e
                ee += w[u] * e * e
                pbe += w[u] * ybar[u] * bu[u] * e
                ebe += w[u] * bu[u] * e * e
                bbe += w[u] * bu[u] * bu[u] * e * e
        A = pe / ee
        # Gauss–Newton on the variable-projection residual: J = -A b e (A re-solved each step)
        g = A * (pbe - A * ebe)  # (1/2) d SSR / dD, holding A
        h = A * A * bbe - (A * ebe) ** 2 / ee  # (1/2) curvature with A profiled
        if not h > 0.0:
            converged = True
            break
        D_new = min(max(D - g / h, d_lo), d_hi)
        step = abs(D_new - D)
        D = D_new
        if step <= GN_XTOL * (abs(D) + GN_XTOL):
            converged = True
            break
    pe = ee = 0.0
    for u in range(nu):
        if high[u]:
            e = math.exp(-bu[u] * D)
            pe += w[u] * ybar[u] * e
            ee += w[u] * e * e
    A = pe / ee
    ssr = 0.0
    for u in range(nu):
        if high[u]:
            r = ybar[u] - A * math.exp(-bu[u] * D)
            ssr += w[u] * r * r
    return A, D, ssr, converged


@jit_voxel
def _pinned(x, lo, hi):
    span = hi - lo if math.isfinite(hi) else max(abs(lo), 1.0)
    return x - lo <= PIN_TOL * span or (math.isfinite(hi) and hi - x <= PIN_TOL * span)


@jit_voxel
def fit_simplified_voxel(Y, v, groups, bu, w, zero, high, bounds, want_sd, ybar, out, sd):
    """Fit voxel row ``v``; write ``out[v]`` (S0, f, NaN, D, R², RMSE) and, when ``want_sd``,
    ``sd[v]`` (S0, f, NaN, D SDs); return the status code."""
    nu = bu.shape[0]
    for u in range(nu):
        ybar[u] = 0.0
    for i in range(Y.shape[1]):
        yi = np.float64(Y[v, i])
        if not math.isfinite(yi):
            return fail_voxel_sd(out, sd, v, st.BAD_INPUT)
        ybar[groups[i]] += yi
    scale = -math.inf
    S0 = 0.0
    n0 = 0.0
    for u in range(nu):
        ybar[u] /= w[u]
        scale = max(scale, ybar[u])
        if zero[u]:
            S0 += w[u] * ybar[u]
            n0 += w[u]
    if not scale > 0.0:
        return fail_voxel_sd(out, sd, v, st.BAD_INPUT)
    S0 /= n0 * scale
    for u in range(nu):
        ybar[u] /= scale
    A, D, ssr_high, converged = _high_b_fit(ybar, bu, w, high, bounds[3, 0] * 1e3,
                                            bounds[3, 1] * 1e3)
    if not (math.isfinite(A) and math.isfinite(D)):
        return fail_voxel_sd(out, sd, v, st.NUMERICAL_FAILURE)
    if not converged:
        return fail_voxel_sd(out, sd, v, st.NO_CONVERGENCE)
    # S0 within its bounds, then f = 1 - A / S0 within its bounds
    S0 = min(max(S0, bounds[0, 0] / scale), bounds[0, 1] / scale)
    if not S0 > 0.0:
        return fail_voxel_sd(out, sd, v, st.NUMERICAL_FAILURE)
    f = min(max(1.0 - A / S0, bounds[1, 0]), bounds[1, 1])
    # fit measures over the samples the model describes (b = 0 and b >= b_threshold)
    mean = 0.0
    n_used = 0
    for i in range(Y.shape[1]):
        u = groups[i]
        if zero[u] or high[u]:
            mean += np.float64(Y[v, i])
            n_used += 1
    mean /= n_used
    ssr = sst = 0.0
    for i in range(Y.shape[1]):
        u = groups[i]
        if zero[u] or high[u]:
            m = S0 if zero[u] else S0 * (1.0 - f) * math.exp(-bu[u] * D)
            yi = np.float64(Y[v, i])
            ssr += (yi - scale * m) ** 2
            sst += (yi - mean) ** 2
    out[v, 0] = S0 * scale
    out[v, 1] = f
    out[v, 2] = math.nan
    out[v, 3] = D * 1e-3
    out[v, 4] = 1.0 - ssr / sst if sst > 0.0 else math.nan
    out[v, 5] = math.sqrt(ssr / n_used)
    for k in range(4):
        sd[v, k] = math.nan
    if want_sd and n_used > 3:
        _simplified_sd(bu, w, zero, high, S0, A, D, ssr / (scale * scale) / (n_used - 3), n0,
                       scale, sd, v)
    if _pinned(D, bounds[3, 0] * 1e3, bounds[3, 1] * 1e3) or _pinned(
            f, bounds[1, 0], bounds[1, 1]) or _pinned(S0 * scale, bounds[0, 0], bounds[0, 1]):
        return st.AT_BOUND
    return st.OK


@jit_voxel
def _simplified_sd(bu, w, zero, high, S0, A, D, s2, n0, scale, sd, v):
    """SDs of S0, f and D: ``var(S0) = sigma² / n0``; (A, D) from ``sigma² (JᵀJ)⁻¹`` of the
    high-b fit; ``f = 1 - A / S0`` by first-order propagation (internal units in, user out)."""
    a00 = a01 = a11 = 0.0
    for u in range(bu.shape[0]):
        if high[u]:
            e = math.exp(-bu[u] * D)
            jd = -A * bu[u] * e
            a00 += w[u] * e * e
            a01 += w[u] * e * jd
            a11 += w[u] * jd * jd
    det = a00 * a11 - a01 * a01
    if not det > 1e-14 * a00 * a11:
        return
    var_A = s2 * a11 / det
    var_D = s2 * a00 / det
    var_S0 = s2 / n0
    var_f = var_A / (S0 * S0) + A * A * var_S0 / S0**4
    sd[v, 0] = math.sqrt(var_S0) * scale
    sd[v, 1] = math.sqrt(var_f)
    sd[v, 3] = math.sqrt(var_D) * 1e-3


@jit_parallel
def fit_simplified_volume(Y, groups, bu, w, zero, high, bounds, want_sd, n_chunks, out, sd,
                          status):
    """Fit the simplified model to every row of ``Y`` (n_vox, n_b) in parallel.

    Parameters
    ----------
    groups : (n_b,) int64
        Index of each sample's unique b-value.
    bu, w : (n_u,) float64
        Unique b-values (ms/µm²) and their sample counts.
    zero, high : (n_u,) bool
        Unique b-values equal to 0, and at or above ``b_threshold``.
    bounds : (4, 2) float64
        User bounds in :data:`fastivim.model.PARAM_NAMES` order (D_star's unused).
    want_sd : bool
        Also fill ``sd``.
    out : (n_vox, 6) float32, output
        S0, f, D_star (always NaN), D (mm²/s), R², RMSE.
    sd : (n_vox, 4) float32, output
        SDs of S0, f, D_star (NaN), D; NaN unless ``want_sd``.
    status : (n_vox,) uint8, output
    """
    n = Y.shape[0]
    nu = bu.shape[0]
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        ybar = np.empty(nu)
        for v in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            status[v] = fit_simplified_voxel(Y, v, groups, bu, w, zero, high, bounds, want_sd,
                                             ybar, out, sd)
