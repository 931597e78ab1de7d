"""The baseline most people start from: ``scipy.optimize.curve_fit`` called once per voxel.

Bounded (trust-region reflective, scipy's default when bounds are given), physical units,
a fixed start (S0 from the lowest b, f = 0.1, D_star = 10e-3, D = 1e-3 mm²/s). Voxels where
scipy raises or returns non-finite values are NaN.
"""

from __future__ import annotations

import warnings

import numpy as np

#: The same bounds as fastivim.DEFAULT_BOUNDS, in (S0, f, D_star, D) order.
LOWER = (0.0, 0.0, 2e-3, 0.1e-3)
UPPER = (np.inf, 0.7, 100e-3, 5e-3)
BOUNDS = {"S0": (0.0, np.inf), "f": (0.0, 0.7), "D_star": (2e-3, 100e-3), "D": (0.1e-3, 5e-3)}


def _ivim(b, S0, f, D_star, D):
    return S0 * (f * np.exp(-b * D_star) + (1.0 - f) * np.exp(-b * D))


def fit_curve_fit(Y, b_values, max_nfev=2000):
    """Fit each row of ``Y`` (n_vox, n_b) with ``curve_fit``; return maps and a failure mask."""
    from scipy.optimize import curve_fit

    Y = np.asarray(Y, dtype=np.float64)
    b = np.asarray(b_values, dtype=np.float64)
    b_lo = b == b.min()
    n = Y.shape[0]
    P = np.full((n, 4), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(n):
            y = Y[i]
            s0 = max(float(y[b_lo].mean()), 1e-6)
            try:
                p, _ = curve_fit(_ivim, b, y, p0=(s0, 0.1, 10e-3, 1e-3), bounds=(LOWER, UPPER),
                                 max_nfev=max_nfev)
            except (RuntimeError, ValueError):
                continue
            if np.all(np.isfinite(p)):
                P[i] = p
    failed = ~np.all(np.isfinite(P), axis=1)
    return {"S0": P[:, 0], "f": P[:, 1], "D_star": P[:, 2], "D": P[:, 3], "failed": failed}
