"""Slow, readable reference fitters that the compiled kernels are compared against.

In the spirit of STUMPY's ``tests/naive.py``: every function here favours clarity over speed,
works in float64 on one voxel at a time, and shares no code with ``fastivim.kernels`` (only the
model equation, :func:`fastivim.ivim_signal`, which is the single home of the IVIM formula).

Units follow the public API: b in s/mm², D and D_star in mm²/s, f dimensionless, S0 in signal
units. Parameter order everywhere is ``(S0, f, D_star, D)`` (:data:`fastivim.PARAM_NAMES`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.optimize import least_squares

from fastivim import PARAM_NAMES, ivim_signal, resolve_bounds


def ssr(params, b_values, y) -> float:
    """Sum of squared residuals of ``(S0, f, D_star, D)`` over every sample of ``y``, in float64.

    Non-finite parameters give ``inf`` (a failed fit is worse than any fit).
    """
    p = np.asarray(params, dtype=np.float64)
    if not np.all(np.isfinite(p)):
        return math.inf
    model = ivim_signal(b_values, *p)
    r = np.asarray(y, dtype=np.float64) - model
    return float(np.dot(r, r))


def group_means(b_values, y):
    """Unique b-values, the mean signal at each, and the number of samples at each."""
    b = np.asarray(b_values, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    b_unique = np.unique(b)
    means = np.array([y[b == v].mean() for v in b_unique])
    counts = np.array([np.count_nonzero(b == v) for v in b_unique], dtype=np.float64)
    return b_unique, means, counts


def loglinear_D(b_values, y, b_threshold=200.0):
    """The segmented method's first step, written out: weighted fit of ``ln S = ln A - b D``.

    Samples with the same b-value are averaged first; each mean ``S_u`` at ``b_u >= b_threshold``
    with ``S_u > 0`` enters with weight ``w_u * S_u**2`` (``w_u`` = number of samples averaged),
    because ``var(ln S) ~ sigma**2 / S**2``.

    Returns
    -------
    (A, D) : floats
        Intercept in signal units and D in mm²/s; ``(nan, nan)`` when fewer than two distinct
        usable b-values remain.
    """
    b_u, s_u, w_u = group_means(b_values, y)
    keep = (b_u >= b_threshold) & (s_u > 0)
    if np.count_nonzero(keep) < 2:
        return math.nan, math.nan
    x = b_u[keep]
    ly = np.log(s_u[keep])
    weight = w_u[keep] * s_u[keep] ** 2
    # weighted least squares: minimise sum weight * (ly - (c - D x))**2
    design = np.column_stack([np.ones_like(x), -x])
    sw = np.sqrt(weight)
    coef, *_ = np.linalg.lstsq(design * sw[:, None], ly * sw, rcond=None)
    return float(np.exp(coef[0])), float(coef[1])


def segmented_D_bound(f, D_star, D, b_first):
    """Largest possible error of the high-b log-linear D on a noise-free signal.

    On a noise-free IVIM signal ``ln S(b) = ln(S0 (1 - f)) - b D + eps(b)`` with
    ``eps(b) = ln(1 + u(b))``, ``u(b) = f / (1 - f) * exp(-b (D_star - D))``. ``eps`` is
    decreasing and convex (``eps'' = (D_star - D)**2 u / (1 + u)**2 > 0``). A (positively)
    weighted least-squares slope is a positively weighted average of the pairwise secant slopes
    ``(eps(b_j) - eps(b_i)) / (b_j - b_i)``, and for a convex decreasing function every secant
    slope lies in ``[eps'(b_first), 0]``, where ``b_first`` is the smallest b-value in the fit.
    Hence, whatever the weights::

        0 <= D_segmented - D <= (D_star - D) * u1 / (1 + u1),   u1 = u(b_first)

    Returns that upper bound in mm²/s.
    """
    u1 = f / (1.0 - f) * math.exp(-b_first * (D_star - D))
    return (D_star - D) * u1 / (1.0 + u1)


def _residuals(q, b_k, y_s):
    """Residuals in scaled units: q = (S0/scale, f, D_star*1e3, D*1e3), b_k = b/1000."""
    S0, f, ds, d = q
    return S0 * (f * np.exp(-b_k * ds) + (1.0 - f) * np.exp(-b_k * d)) - y_s


def _jacobian(q, b_k, y_s):
    S0, f, ds, d = q
    e1 = np.exp(-b_k * ds)
    e2 = np.exp(-b_k * d)
    return np.column_stack([
        f * e1 + (1.0 - f) * e2,
        S0 * (e1 - e2),
        -S0 * f * b_k * e1,
        -S0 * (1.0 - f) * b_k * e2,
    ])


def starting_points(b_values, y, bounds):
    """A handful of independent starts for the full fit (no grid shared with the kernels).

    A log-linear D from the top half of the b-values, S0 from the largest sample, and a
    small set of (f, D_star) guesses spread over the physiological range; each is clipped
    into the bounds.
    """
    b = np.asarray(b_values, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    S0 = max(float(np.max(y)), 1e-12)
    high = b >= np.median(b)
    d_guess = 1e-3
    if np.unique(b[high]).size >= 2 and np.all(y[high] > 0):
        slope = np.polyfit(b[high], np.log(y[high]), 1)[0]
        if np.isfinite(slope) and slope < 0:
            d_guess = -slope
    starts = []
    for f in (0.1, 0.3):
        for ds in (8e-3, 30e-3, 80e-3):
            starts.append((S0, f, ds, d_guess))
    starts.append((S0, 0.2, 20e-3, 1e-3))
    lo = np.array([bounds[k][0] for k in PARAM_NAMES])
    hi = np.array([bounds[k][1] for k in PARAM_NAMES])
    span = np.where(np.isfinite(hi), hi - lo, 1.0)
    lo_in = lo + 1e-3 * span
    hi_in = np.where(np.isfinite(hi), hi - 1e-3 * span, np.inf)
    return [np.clip(np.array(s), lo_in, hi_in) for s in starts]


def fit_full_scipy(b_values, y, bounds=None, starts=None):
    """Bounded nonlinear least squares with ``scipy.optimize.least_squares`` from several starts.

    Minimises the plain (unweighted) sum of squared residuals over all samples, with the same
    bounds as :func:`fastivim.fit_ivim`. Each start runs the trust-region-reflective solver with
    an analytic Jacobian and tight tolerances (1e-14) in well-scaled units (S0 divided by the
    largest sample, D and D_star in µm²/ms). Solutions with ``D_star <= D`` are discarded (the
    fastivim contract requires ``D_star > D``); of the rest the lowest SSR wins.

    Returns
    -------
    (params, ssr) : ((4,) float64 array or None, float)
        The best admissible ``(S0, f, D_star, D)`` in user units and its float64 SSR, or
        ``(None, inf)`` when no start ends with ``D_star > D``.
    """
    bounds = resolve_bounds(bounds)
    b = np.asarray(b_values, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    scale = float(np.max(np.abs(y)))
    if not scale > 0:
        return None, math.inf
    unit = np.array([scale, 1.0, 1e-3, 1e-3])  # user = scaled * unit
    lo = np.array([bounds[k][0] for k in PARAM_NAMES]) / unit
    hi = np.array([bounds[k][1] for k in PARAM_NAMES]) / unit
    b_k = b * 1e-3
    y_s = y / scale
    if starts is None:
        starts = starting_points(b, y, bounds)
    best, best_ssr = None, math.inf
    for start in starts:
        q0 = np.clip(np.asarray(start, dtype=np.float64) / unit, lo, hi)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sol = least_squares(_residuals, q0, jac=_jacobian, bounds=(lo, hi), args=(b_k, y_s),
                                method="trf", x_scale="jac", ftol=1e-14, xtol=1e-14,
                                gtol=1e-14, max_nfev=2000)
        params = sol.x * unit
        if not params[2] > params[3]:
            continue
        s = ssr(params, b, y)
        if s < best_ssr:
            best, best_ssr = params, s
    return best, best_ssr


def bayes_posterior(b_values, y, M, logw, par, cvar, sigma, s0_bounds, log_cutoff=30.0):
    """Posterior mean and SD of one voxel over the grid of the Bayesian method.

    ``M`` (n_u, n_g) is the model at each grid point for the unique b-values (S0 = 1), ``logw``
    (n_g,) the log prior weights, ``par`` (3, n_g) the grid's (f, D_star, D), ``cvar`` (3, n_g)
    each cell's own variance. The magnitude bias is removed per sample (``sqrt(max(y² - σ²,
    0))``); S0 is integrated out under a flat prior (the Gaussian integral peaks at the clipped
    least-squares scale and has width ``σ / |m_g|``); terms below ``exp(-log_cutoff)`` of the
    largest are dropped. Returns ``(mean, sd)``, each ``(S0, f, D_star, D)``.
    """
    bu, groups = np.unique(np.asarray(b_values, dtype=np.float64), return_inverse=True)
    w = np.bincount(groups).astype(np.float64)
    yd = np.sqrt(np.maximum(np.asarray(y, dtype=np.float64) ** 2 - sigma**2, 0.0))
    ybar = np.bincount(groups, weights=yd) / w
    nn = w @ (M * M)
    a = (w * ybar) @ M
    s = np.clip(a / nn, *s0_bounds)
    ll = (2 * s * a - s * s * nn) / (2 * sigma**2) - 0.5 * np.log(nn) + logw
    d = ll - ll.max()
    p = np.where(d > -log_cutoff, np.exp(d), 0.0)
    p /= p.sum()
    mean = np.array([p @ s, p @ par[0], p @ par[1], p @ par[2]])
    second = np.array([p @ (s * s + sigma**2 / nn), p @ (par[0] ** 2 + cvar[0]),
                       p @ (par[1] ** 2 + cvar[1]), p @ (par[2] ** 2 + cvar[2])])
    return mean, np.sqrt(np.maximum(second - mean**2, 0.0))
