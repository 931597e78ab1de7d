"""Spatial IVIM estimator: the posterior of a voxel's local tissue from its adaptive neighbourhood.

Two passes over the voxels:

1. the per-voxel posterior of :func:`fastivim.kernels.bayes.posterior_volume` (mean and SD of
   S0, f, D_star, D under the prior learned from the volume), run by the caller;
2. :func:`spatial_posterior`: for voxel ``v``, the neighbours ``u`` within a radius in mm (and
   ``v`` itself) pool their signals, each with a weight ``w_uv`` that is 1 up to half the
   bandwidth and falls to 0 at the bandwidth of the statistical distance between the two
   voxels' pass-1 posteriors (adaptive weights with the propagation-separation kernel, Polzehl
   & Spokoiny 2006, doi:10.1007/s00440-005-0464-1): voxels of another tissue give no evidence,
   so organ edges and lesions are not blurred. Each neighbour's Rician-debiased group means are
   scaled by its pass-1 S0, and a common scale ``c`` is left free, so that the neighbourhood's
   Gaussian log-likelihood at ``(D_j, D*_k)`` with amplitudes ``alpha = c (1 - f)``, ``beta =
   c f`` needs only the pooled statistics

       ``Ybar = sum_u w_uv S0_u w_b ybar_ub``,  ``Wbar = sum_u w_uv S0_u²``

   and is Gaussian in ``(alpha, beta)``: it integrates in closed form, f's mean and variance
   follow by the delta method (:func:`local_posterior`). The pairs ``(D_j, D*_k)`` lie on a grid
   4 times finer in D than the Bayesian method's (a window around pass 1's D) times its D_star
   grid, weighted by the learned prior summed over f. Its posterior mean is the map: the
   parameters of the voxel's local tissue. The reported SD adds to the posterior variance
   (times the pooled residual's dispersion, at least 1) a within-tissue variation ``tau``
   (relative), because a voxel differs from its neighbourhood's tissue by more than no single
   voxel's data can resolve at clinical SNR.

The cost per voxel is one pass over ~40 neighbours' pooled statistics and a few hundred
(D, D_star) pairs, whatever the number of b-values; deterministic whatever the thread count:
each voxel's row is written by one thread and depends only on its own and its neighbours' rows,
summed in a fixed order.
"""

import math
from collections import namedtuple

import numpy as np
from numba import prange

from . import status as st
from ._jit import jit_parallel, jit_voxel
from .bayes import EDGE_MASS, LOG_CUTOFF, _raw_fit_measures, debiased_means
from .voxel import fail_voxel_sd

SpatialTables = namedtuple("SpatialTables", [
    "dF", "dvar", "logd0", "dstep", "ED", "ds", "dsvar", "ES", "GI", "LP",
    "f_lo", "f_hi", "ds_lo_is_bound", "d_lo_is_bound"])
SpatialTables.__doc__ = """Voxel-independent tables of the second pass (:func:`spatial_posterior`).

Fields
------
dF : (n_j,) float64
    Fine log-spaced D grid (mm²/s), ``logd0`` its first value's log and ``dstep`` its log step;
    ``dvar`` (n_j,) each cell's own variance.
ED : (n_j, n_u) float64
    ``exp(-b D_j)``.
ds : (n_k,) float64; dsvar : (n_k,) float64; ES : (n_k, n_u) float64
    The D_star grid (the Bayesian grid's, refined), cell variances, ``exp(-b D*_k)``.
GI : (n_j, n_k, 4) float64
    Per pair the inverse of the weighted Gram matrix ``G`` of ``ED[j]`` and ``ES[k]``
    (entries 11, 12, 22) and ``-0.5 log det G``.
LP : (n_j, n_k) float64
    Log prior of each (D_j, D*_k): the learned grid prior summed over f, interpolated linearly
    in log D; ``-inf`` where D*_k < 2 D_j or the prior has no support.
f_lo, f_hi : float
    f bounds.
ds_lo_is_bound, d_lo_is_bound : bool
    Whether the lowest grid value is the parameter's bound (not a floor above it).
"""


@jit_parallel
def weighted_means(Y, groups, w, sigma2, n_chunks, YB):
    """``YB[v, u] = w_u * ybar_u`` (n_vox, n_u + 1) float64: each row's Rician-debiased group
    means (:func:`fastivim.kernels.bayes.debiased_means`) times the group sizes, the quantity
    the neighbourhoods pool, then ``sum_u w_u ybar_u²`` (for the pooled residual); 0 where a
    sample is not finite."""
    n = Y.shape[0]
    nu = w.shape[0]
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        ybar = np.empty(nu)
        for v in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            raw = debiased_means(Y, v, groups, w, sigma2, ybar)
            good = math.isfinite(raw)
            yy = 0.0
            for u in range(nu):
                YB[v, u] = w[u] * ybar[u] if good else 0.0
                yy += w[u] * ybar[u] * ybar[u]
            YB[v, nu] = yy if good else 0.0


@jit_voxel
def _distance2(FS, u, v):
    """Statistical distance between the pass-1 posteriors of rows ``u`` and ``v``: over f and
    log D_star, log D, the squared difference of the means over the sum of the variances
    (``FS`` of :func:`spatial_posterior`)."""
    d2 = 0.0
    for j in range(3):
        dm = FS[u, j] - FS[v, j]
        d2 += dm * dm / (FS[u, 3 + j] + FS[v, 3 + j])
    return d2


@jit_voxel
def pool_neighbours(YB, v, out, FS, ok, coords, vidx, offsets, hinv, YP):
    """Pool the neighbourhood of voxel row ``v`` into ``YP`` (n_u + 3): ``sum_u w_uv S0_u
    YB[u]`` (``YB`` of :func:`weighted_means`), then ``Wbar = sum_u w_uv S0_u²``, the sum of
    the weights (the voxel itself counts with weight 1) and ``sum_u w_uv sum_b w_b ybar_ub²``.

    ``out`` holds the pass-1 posterior means (S0 in column 0), ``FS`` their features for the
    distance (:func:`_distance2`), ``ok`` (n_vox,) whether a row may
    be pooled, ``coords`` (n_vox, 3) each row's voxel index, ``vidx`` (X, Y, Z) each voxel's
    row (-1 outside the mask), ``offsets`` (K, 3) the neighbourhood (itself excluded), ``hinv``
    the inverse bandwidth of the weights ``min(1, 2 (1 - d² hinv))`` (0 when negative).
    """
    nu = YB.shape[1] - 1
    for k in range(nu + 3):
        YP[k] = 0.0
    nx, ny, nz = vidx.shape
    x0 = coords[v, 0]
    y0 = coords[v, 1]
    z0 = coords[v, 2]
    for k in range(-1, offsets.shape[0]):
        if k < 0:
            u = v
            wt = 1.0
        else:
            x = x0 + offsets[k, 0]
            y = y0 + offsets[k, 1]
            z = z0 + offsets[k, 2]
            if x < 0 or x >= nx or y < 0 or y >= ny or z < 0 or z >= nz:
                continue
            u = vidx[x, y, z]
            if u < 0 or not ok[u]:
                continue
            # the propagation-separation kernel: full weight up to half the bandwidth, then
            # falling linearly to 0 at the bandwidth
            wt = min(1.0, 2.0 * (1.0 - _distance2(FS, u, v) * hinv))
            if not wt > 0.0:
                continue
        s0 = np.float64(out[u, 0])
        ws = wt * s0
        for j in range(nu):
            YP[j] += ws * YB[u, j]
        YP[nu] += ws * s0
        YP[nu + 1] += wt
        YP[nu + 2] += wt * YB[u, nu]


@jit_voxel
def _truncated_normal(mu, s, lo, hi):
    """(log mass, mean, variance) of ``N(mu, s²)`` restricted to ``[lo, hi]``: the mass is
    that of the untruncated density's integral (1 when the interval holds it all)."""
    a = (lo - mu) / s
    b = (hi - mu) / s
    if a < -6.0 and b > 6.0:  # the interval holds all but 2e-9 of the mass
        return 0.0, mu, s * s
    if a > 6.0:  # the mass lies far below the interval: it piles up at its lower end
        return -0.5 * a * a - math.log(a * SQRT_2PI), lo + s / a, (s / a) ** 2
    if b < -6.0:
        return -0.5 * b * b - math.log(-b * SQRT_2PI), hi + s / b, (s / b) ** 2
    z = 0.5 * (math.erfc(-b * INV_SQRT2) - math.erfc(-a * INV_SQRT2))
    if not z > 1e-300:
        return -math.inf, mu, s * s
    pa = math.exp(-0.5 * a * a) / SQRT_2PI
    pb = math.exp(-0.5 * b * b) / SQRT_2PI
    ga = a * pa if a > -8.0 else 0.0
    gb = b * pb if b < 8.0 else 0.0
    r = (pa - pb) / z
    return math.log(z), mu + s * r, s * s * max(1.0 + (ga - gb) / z - r * r, 1e-12)


SQRT_2PI = math.sqrt(2.0 * math.pi)
INV_SQRT2 = 1.0 / math.sqrt(2.0)


@jit_voxel
def local_posterior(YP, WB, nu, j0, j1, tb, sig2, inv2s2, AS, L, MF, VF, Z):
    """Posterior sums of the pooled likelihood over the fine D grid rows ``j0 .. j1`` (all
    D_star values), with f integrated analytically, into ``Z`` (13,): normaliser, first and
    second moments of f, D_star, D, then the mass at the lower / upper end of D_star and D.

    For fixed (D_j, D_star_k) the model with a free scale ``c`` (the neighbourhood's S0
    relative to the pass-1 S0 its signals were scaled by: a bias of pass 1's S0 would
    otherwise become a bias of f) is linear in the amplitudes ``alpha = c (1 - f)`` and ``beta
    = c f`` of ``E_j`` and ``E*_k``, so the pooled log-likelihood ``(2 <Ybar, m>_w - Wbar
    |m|²_w) / (2 sigma²)`` is Gaussian in them and integrates in closed form (``-0.5 log det
    G``, ``G`` the 2 x 2 Gram matrix of ``E_j, E*_k``); f's mean and variance follow by the
    delta method, truncated to the f bounds (:func:`_truncated_normal`). That integral times
    the prior ``tb.LP[j, k]`` weighs the pair. ``YP`` (n_u,) the pooled ``w_u S0_u ybar_u``,
    ``WB`` the
    pooled ``S0²``; ``AS`` (n_k,), ``L``, ``MF``, ``VF`` (n_j * n_k) scratch.
    """
    nk = tb.ES.shape[0]
    for k in range(nk):
        t = 0.0
        for u in range(nu):
            t += YP[u] * tb.ES[k, u]
        AS[k] = t
    mx = -math.inf
    inv_wb = 1.0 / WB
    for j in range(j0, j1):
        aj = 0.0
        for u in range(nu):
            aj += YP[u] * tb.ED[j, u]
        for k in range(nk):
            i = (j - j0) * nk + k
            lp = tb.LP[j, k]
            if lp == -math.inf:
                L[i] = -math.inf
                continue
            g11 = tb.GI[j, k, 0]
            g12 = tb.GI[j, k, 1]
            g22 = tb.GI[j, k, 2]
            ak = AS[k]
            # (alpha, beta) = G^-1 (a_j, a*_k) / Wbar: the amplitudes of E_j and E*_k
            al = (g11 * aj + g12 * ak) * inv_wb
            be = (g12 * aj + g22 * ak) * inv_wb
            tot = al + be
            if not tot > 0.0:
                L[i] = -math.inf
                continue
            # f = beta / (alpha + beta) by the delta method; cov(alpha, beta) = sigma² G^-1 / Wbar
            r2 = 1.0 / (tot * tot)
            da = -be * r2
            db = al * r2
            vf = (da * da * g11 + 2.0 * da * db * g12 + db * db * g22) * inv_wb * sig2
            lz, m, v = _truncated_normal(be / tot, math.sqrt(vf), tb.f_lo, tb.f_hi)
            L[i] = (al * aj + be * ak) * inv2s2 + tb.GI[j, k, 3] + lz + lp
            MF[i] = m
            VF[i] = v
            mx = max(mx, L[i])
    for r in range(13):
        Z[r] = 0.0
    for j in range(j0, j1):
        d = tb.dF[j]
        d2 = d * d + tb.dvar[j]
        for k in range(nk):
            i = (j - j0) * nk + k
            x = L[i] - mx
            if not x > -LOG_CUTOFF:
                continue
            p = math.exp(x)
            ds = tb.ds[k]
            Z[0] += p
            Z[1] += p * MF[i]
            Z[2] += p * (VF[i] + MF[i] * MF[i])
            Z[3] += p * ds
            Z[4] += p * (ds * ds + tb.dsvar[k])
            Z[5] += p * d
            Z[6] += p * d2
            if k == 0:
                Z[7] += p
            if k == nk - 1:
                Z[8] += p
            if j == 0:
                Z[9] += p
            if j == tb.dF.shape[0] - 1:
                Z[10] += p


@jit_voxel
def _dispersion(YP, nu, bu, w, f, Ds, D, sigma2):
    """The pooled residual over its expectation, at least 1: ``phi = RSS / (sigma² (n_u
    sum_u w_uv - 4))``, ``RSS = sum_u w_uv sum_b w_b (ybar_ub - c S0_u m_b)²`` at the posterior
    mean's model ``m`` with the best common scale ``c``. Neighbours that differ from the voxel
    by more than the noise (an edge the weights did not cut, a gradient) raise it."""
    a = 0.0
    nn = 0.0
    for u in range(nu):
        m = f * math.exp(-bu[u] * Ds) + (1.0 - f) * math.exp(-bu[u] * D)
        a += YP[u] * m
        nn += w[u] * m * m
    wb = YP[nu]
    rss = YP[nu + 2] - a * a / (wb * nn) if wb * nn > 0.0 else 0.0
    dof = nu * YP[nu + 1] - 4.0
    if not dof > 1.0:
        return 1.0
    return max(rss / (sigma2 * dof), 1.0)


@jit_voxel
def finish_spatial(Y, v, groups, bu, out1, sd1, ok, Z, tb, tau2, f0sq, phi, out, sd):
    """Write voxel row ``v``'s spatial estimate and SD from the sums ``Z`` of
    :func:`local_posterior`; S0 and its SD are pass 1's (the voxel's own). The SD of f, D_star,
    D adds the within-tissue variation ``tau2`` (3,): relative for D_star and D, relative to
    ``f² + f0sq`` for f, to the posterior variance times the dispersion ``phi``
    (:func:`_dispersion`). Returns the status."""
    if not ok[v]:
        return fail_voxel_sd(out, sd, v, st.BAD_INPUT if math.isnan(out1[v, 0])
                             else st.NUMERICAL_FAILURE)
    z = 1.0 / Z[0]
    f = Z[1] * z
    Ds = Z[3] * z
    D = Z[5] * z
    if not (math.isfinite(f) and math.isfinite(Ds) and math.isfinite(D)):
        return fail_voxel_sd(out, sd, v, st.NUMERICAL_FAILURE)
    S0 = np.float64(out1[v, 0])
    out[v, 0] = S0
    out[v, 1] = f
    out[v, 2] = Ds
    out[v, 3] = D
    sd[v, 0] = sd1[v, 0]
    vf = phi * max(Z[2] * z - f * f, 0.0) + tau2[0] * (f * f + f0sq)
    vds = phi * max(Z[4] * z - Ds * Ds, 0.0) + tau2[1] * Ds * Ds
    vd = phi * max(Z[6] * z - D * D, 0.0) + tau2[2] * D * D
    sd[v, 1] = math.sqrt(vf)
    sd[v, 2] = math.sqrt(vds)
    sd[v, 3] = math.sqrt(vd)
    r2, rmse = _raw_fit_measures(Y, v, groups, bu, S0, f, Ds, D)
    out[v, 4] = r2
    out[v, 5] = rmse
    edge_mass = 0.0
    for k in range(7, 11):
        if (k != 7 or tb.ds_lo_is_bound) and (k != 9 or tb.d_lo_is_bound):
            edge_mass = max(edge_mass, Z[k])
    if edge_mass * z > EDGE_MASS:
        return st.AT_BOUND
    return st.OK


@jit_voxel
def _window(out1, sd1, v, tb):
    """Rows ``j0 .. j1`` of the fine D grid around pass 1's D (its mean +- WINDOW_SD SDs in
    log D, at least +- WINDOW_MIN)."""
    d = np.float64(out1[v, 3])
    h = max(WINDOW_SD * np.float64(sd1[v, 3]) / d, WINDOW_MIN)
    lo = math.log(d) - h
    hi = math.log(d) + h
    j0 = int(math.floor((lo - tb.logd0) / tb.dstep))
    j1 = int(math.ceil((hi - tb.logd0) / tb.dstep)) + 1
    n = tb.dF.shape[0]
    return min(max(j0, 0), n - 1), min(max(j1, 1), n)


#: Half-width of the window of fine D values around pass 1's D, in pass-1 SDs of log D, and
#: at least (log units).
WINDOW_SD = 3.0
WINDOW_MIN = 0.15


@jit_parallel
def spatial_posterior(Y, YB, groups, w, bu, sigma2, tb, out1, sd1, FS, ok, coords, vidx,
                      offsets, hinv, tau2, f0sq, r0, r1, n_chunks, out, sd, status, nsum):
    """Pass 2: the spatial posterior mean (``out``, (n_vox, 6) float32 as the least-squares
    kernels) and SD (``sd``, (n_vox, 4) float32) of every row of ``Y`` (n_vox, n_b) (``YB`` its
    :func:`weighted_means`), its ``status`` (n_vox,) uint8 and ``nsum`` (n_vox,) float32, the
    sum of the pooling weights.

    ``tb`` the :class:`SpatialTables`; ``out1``/``sd1`` (float32) pass 1's results, ``FS``
    (n_vox, 6) float64 their f, log D_star, log D and those features' variances (``(sd /
    value)²`` for the logs), ``ok`` (n_vox,) where they are usable; the neighbourhood
    arguments are those of :func:`pool_neighbours`, ``tau2``/``f0sq`` those of
    :func:`finish_spatial`. Only rows ``r0 .. r1`` are written (the caller runs the volume in
    blocks, so that Ctrl-C and the progress bar are honoured); a row's result does not depend on
    the block it falls in.
    """
    n = r1 - r0
    nu = YB.shape[1] - 1
    nk = tb.ES.shape[0]
    nj = tb.dF.shape[0]
    inv2s2 = 0.5 / sigma2
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        YP = np.empty(nu + 3)
        AS = np.empty(nk)
        L = np.empty(nj * nk)
        MF = np.empty(nj * nk)
        VF = np.empty(nj * nk)
        Z = np.empty(13)
        for v in range(r0 + c * n // n_chunks, r0 + (c + 1) * n // n_chunks):
            nsum[v] = 0.0
            if ok[v]:
                pool_neighbours(YB, v, out1, FS, ok, coords, vidx, offsets, hinv, YP)
                j0, j1 = _window(out1, sd1, v, tb)
                local_posterior(YP, YP[nu], nu, j0, j1, tb, sigma2, inv2s2, AS, L, MF, VF, Z)
                nsum[v] = YP[nu + 1]
                phi = _dispersion(YP, nu, bu, w, Z[1] / Z[0], Z[3] / Z[0], Z[5] / Z[0], sigma2)
            else:
                phi = 1.0
            status[v] = finish_spatial(Y, v, groups, bu, out1, sd1, ok, Z, tb, tau2, f0sq,
                                       phi, out, sd)
