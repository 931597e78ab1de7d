"""A readable NumPy-vectorised Levenberg–Marquardt IVIM fitter: the "best pure-NumPy peer".

All voxels are fitted at once: every array has a leading voxel axis, each LM iteration is a few
whole-array NumPy operations plus a batched 4×4 solve, and bounds are enforced by clipping the
step (projected LM). Voxels that have converged drop out of the active set. No numba, no loop
over voxels; it is what a careful NumPy user would write, and the yardstick fastivim's compiled
kernels are compared with in ``bench/bench_kernels.py`` and ``bench/bench_peers.py``.

Model (the same as fastivim's): ``S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D))``,
b in s/mm², D and D_star in mm²/s. Internally b is in ms/µm² and D in µm²/ms (both scaled by
1e-3 / 1e3) and the signal is divided by each voxel's maximum, so all parameters are O(1).
"""

from __future__ import annotations

import numpy as np

#: (lower, upper) per parameter, physical units; the same as fastivim.DEFAULT_BOUNDS.
BOUNDS = {"S0": (0.0, np.inf), "f": (0.0, 0.7), "D_star": (2e-3, 100e-3), "D": (0.1e-3, 5e-3)}


def _model_jac(P, b):
    """Model (n, nb) and Jacobian (n, nb, 4) for parameters P = (S0, f, D*, D), (n, 4)."""
    S0, f, Ds, D = (P[:, i:i + 1] for i in range(4))
    e1 = np.exp(-b * Ds)
    e2 = np.exp(-b * D)
    mix = f * e1 + (1.0 - f) * e2
    J = np.empty(e1.shape + (4,))
    J[..., 0] = mix
    J[..., 1] = S0 * (e1 - e2)
    J[..., 2] = -S0 * f * b * e1
    J[..., 3] = -S0 * (1.0 - f) * b * e2
    return S0 * mix, J


def _ssr(P, b, y):
    S0, f, Ds, D = (P[:, i:i + 1] for i in range(4))
    r = y - S0 * (f * np.exp(-b * Ds) + (1.0 - f) * np.exp(-b * D))
    return np.einsum("ij,ij->i", r, r)


def fit_numpy_lm(Y, b_values, bounds=None, b_threshold=200.0, max_iter=100, ftol=1e-10):
    """Fit every row of ``Y`` (n_vox, n_b) with a vectorised, bounded Levenberg–Marquardt.

    Start: D and the intercept from a log-linear fit of the samples with b >= ``b_threshold``,
    S0 from the lowest-b sample, f = 1 - intercept / S0, D_star = 10 D (all clipped to bounds).

    Returns
    -------
    dict
        ``S0``, ``f``, ``D_star``, ``D`` (n_vox,) float64 in physical units, ``converged``
        (bool) and ``iterations`` (int, the largest over voxels). Failed voxels are NaN.
    """
    bnd = dict(BOUNDS, **(bounds or {}))
    Y = np.asarray(Y, dtype=np.float64)
    n = Y.shape[0]
    b = np.asarray(b_values, dtype=np.float64) * 1e-3  # ms/µm²
    scale = Y.max(axis=1)
    ok = np.isfinite(scale) & (scale > 0)
    scale = np.where(ok, scale, 1.0)
    y = Y / scale[:, None]

    lo = np.array([bnd["S0"][0], bnd["f"][0], bnd["D_star"][0] * 1e3, bnd["D"][0] * 1e3])
    hi = np.array([bnd["S0"][1], bnd["f"][1], bnd["D_star"][1] * 1e3, bnd["D"][1] * 1e3])
    # S0 is fitted in units of the voxel maximum: its bounds are only meaningful as (0, inf)

    # --- start: log-linear high-b fit (vectorised normal equations)
    high = b >= b_threshold * 1e-3
    bh = b[high]
    ly = np.log(np.maximum(y[:, high], 1e-6))
    bm = bh.mean()
    slope = ((bh - bm) * (ly - ly.mean(axis=1, keepdims=True))).sum(axis=1) / ((bh - bm) ** 2).sum()
    intercept = np.exp(ly.mean(axis=1) - slope * bm)
    S0 = y[:, np.argmin(b)]
    P = np.empty((n, 4))
    P[:, 0] = S0
    P[:, 3] = -slope
    P[:, 1] = 1.0 - intercept / np.maximum(S0, 1e-12)
    P[:, 2] = 10.0 * P[:, 3]
    P = np.clip(P, lo, hi)

    lam = np.full(n, 1e-3)
    ssr = _ssr(P, b, y)
    active = np.flatnonzero(ok)
    converged = np.zeros(n, dtype=bool)
    it = 0
    eye = np.eye(4)
    while active.size and it < max_iter:
        it += 1
        Pa, ya = P[active], y[active]
        m, J = _model_jac(Pa, b)
        r = ya - m
        JTJ = np.einsum("nbi,nbj->nij", J, J)
        g = np.einsum("nbi,nb->ni", J, r)
        A = JTJ + lam[active, None, None] * (JTJ * eye + 1e-12 * eye)
        step = np.linalg.solve(A, g[..., None])[..., 0]
        Pn = np.clip(Pa + step, lo, hi)
        ssr_new = _ssr(Pn, b, ya)
        better = ssr_new < ssr[active]
        acc = active[better]
        # converged: accepted step with a tiny relative decrease, or damping gave up
        small = better & (ssr[active] - ssr_new <= ftol * (ssr[active] + 1e-30))
        P[acc] = Pn[better]
        ssr[acc] = ssr_new[better]
        lam[acc] = np.maximum(lam[acc] / 10.0, 1e-12)
        rej = active[~better]
        lam[rej] *= 10.0
        done = small | (lam[active] > 1e10)
        converged[active[done]] = True
        active = active[~done]

    Dh = P[:, 3] * 1e-3
    Dsh = P[:, 2] * 1e-3
    swap = Dsh < Dh  # keep D_star the faster compartment, as osipy and dipy do
    f = np.where(swap, 1.0 - P[:, 1], P[:, 1])
    D, D_star = np.where(swap, Dsh, Dh), np.where(swap, Dh, Dsh)
    out = {"S0": P[:, 0] * scale, "f": f, "D_star": D_star, "D": D}
    bad = ~ok | ~np.isfinite(ssr)
    for k in ("S0", "f", "D_star", "D"):
        out[k] = np.where(bad, np.nan, out[k])
    out["converged"] = converged & ~bad
    out["iterations"] = it
    return out


def demo():  # pragma: no cover - a quick manual check
    import time

    import fastivim

    ph = fastivim.simulate.phantom(100_000, snr=30, seed=0)
    t = time.perf_counter()
    r = fit_numpy_lm(ph.signal, ph.b_values)
    dt = time.perf_counter() - t
    for p in ("D", "D_star", "f"):
        err = np.nanmedian(np.abs(r[p] / getattr(ph, p) - 1))
        print(f"{p}: median abs rel error {err:.3f}")
    print(f"{ph.signal.shape[0] / dt:,.0f} voxels/s, {r['iterations']} iterations, "
          f"{r['converged'].mean():.3f} converged")


if __name__ == "__main__":
    demo()
