"""Grid empirical-Bayes IVIM fit: a prior learned from the volume, posterior mean and SD per voxel.

The model ``S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D))`` is evaluated, with
S0 = 1, on a fixed grid over (D, D_star, f) inside the bounds (log-spaced D and D_star, linear
f, both bounds included; points with D_star < 2 D dropped). For a voxel with group means ``y``
(n_u,), S0 is integrated out at each grid point ``g`` under a flat prior: the Gaussian
integral over S0 peaks at the weighted least-squares scale ``s_g = <y, m_g> / |m_g|²``
(clipped to the S0 bounds) and has width ``sigma / |m_g|``, which leaves the log-likelihood

    ``ll_g = (2 s_g <y, m_g> - s_g² |m_g|²) / (2 sigma²) - log |m_g|``  (up to a voxel constant)

with one noise ``sigma`` for the volume. The ``- log |m_g|`` term (the width of the S0
integral; ``lnorm`` of :func:`make_bayes_tables`) is what a profile likelihood (S0 set to its
best value) leaves out: it favours the grid points whose model decays fast, whose S0 the data
pin less well. With it the posterior of D_star is as wide as it should be at low SNR (95%
coverage of D_star on the 144x144x12 tissue phantom of ``bench/bench_accuracy.py``: 0.901 ->
0.954 at osipi18 SNR 10, 0.891 -> 0.971 at clinical11 SNR 10, 0.866 -> 0.883 at clinical11
SNR 20; pooled RMSE within 0.02 of the profile likelihood's).

The prior is a weight per grid point, learned by EM on a subsample of voxels (a non-parametric
maximum-likelihood prior: Laird 1978, JASA 73:805; for IVIM cf. Orton et al. 2014,
doi:10.1002/mrm.24649 and Gustafsson et al. 2018, doi:10.1002/mrm.26783). The posterior over the
grid then gives each voxel's mean (the map) and SD (the uncertainty). Magnitude data are
debiased first: ``sqrt(max(y² - sigma², 0))`` per sample.

Everything here is deterministic whatever the thread count: each voxel's row is written by one
thread, and every sum runs sequentially in a fixed order (the EM's column sums run over voxels
in index order inside one thread per column block).
"""

import math

import numpy as np
from numba import njit, prange

from . import status as st
from ._jit import FASTMATH_FLAGS, jit_parallel, jit_voxel
from .voxel import fail_voxel_sd

#: A cached kernel that runs on the calling thread (no ``prange`` inside).
_jit_serial = njit(cache=True, fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True)

#: Grid sizes over D, D_star and f.
N_D = 32
N_DSTAR = 16
N_F = 16

#: Grid points keep D_star >= DSTAR_OVER_D * D (the perfusion compartment is the fast one).
DSTAR_OVER_D = 2.0

#: Lowest grid values (mm²/s) used when a lower bound is below them (0 cannot be log-spaced).
GRID_FLOOR_D = 5e-5
GRID_FLOOR_DSTAR = 1e-3

#: Posterior terms below exp(-LOG_CUTOFF) of a voxel's largest term are skipped (< 1e-13).
LOG_CUTOFF = 30.0

#: A parameter whose posterior puts more than this share of its mass on the grid value at one
#: of its bounds is reported as pinned at that bound (status AT_BOUND), as the least-squares
#: fits are when their minimum lies on a bound.
EDGE_MASS = 0.5

#: Columns of the per-voxel uncertainty output, in :data:`fastivim.model.PARAM_NAMES` order.
SD_COLUMNS = ("S0_sd", "f_sd", "D_star_sd", "D_sd")


def _grid_log(lo, hi, floor, n):
    """``n`` log-spaced points from ``max(lo, floor)`` to ``hi`` (both included: a tissue at a
    bound, e.g. the liver's D_star of 0.1 mm²/s, must be reachable) and their log spacing."""
    lo = max(lo, min(floor, hi))
    if not hi > lo:
        return np.full(n, hi), 0.0
    step = math.log(hi / lo) / (n - 1)
    return lo * np.exp(step * np.arange(n)), step


def make_bayes_tables(b_values, bounds):
    """Voxel-independent grid tables of the Bayesian kernels.

    Parameters
    ----------
    b_values : (n_b,) float64
        b-values in s/mm², in the column order of the signal matrix.
    bounds : (4, 2) float64
        Bounds in :data:`fastivim.model.PARAM_NAMES` order, user units.

    Returns
    -------
    dict
        ``groups`` (n_b,) int64 index of each sample's unique b-value, ``w`` (n_u,) group sizes,
        ``bu`` (n_u,) unique b (s/mm²); ``M`` (n_u, n_g) the model ``f e^(-b D*) + (1-f)
        e^(-b D)`` at each grid point (S0 = 1), ``nn`` (n_g,) its weighted squared norm
        ``sum w m²``; ``par`` (3, n_g) the grid's (f, D_star, D) in user units; ``cvar``
        (3, n_g) each cell's own variance (uniform over the cell: ``h²/12``), added to the
        posterior variance so that the SD never claims more precision than the grid has;
        ``edge`` (3, n_g) int8: -1 / +1 where the point's value of that parameter is its lower
        / upper bound, else 0; ``lnorm`` (n_g,) ``-log |m_g| = -0.5 log nn``, the log width of
        the integral over S0, added to every grid point's log-likelihood.
    """
    b = np.asarray(b_values, dtype=np.float64)
    bu, groups = np.unique(b, return_inverse=True)
    w = np.bincount(groups).astype(np.float64)
    d, d_ratio = _grid_log(bounds[3, 0], bounds[3, 1], GRID_FLOOR_D, N_D)
    ds, ds_ratio = _grid_log(bounds[2, 0], bounds[2, 1], GRID_FLOOR_DSTAR, N_DSTAR)
    f_lo, f_hi = float(bounds[1, 0]), float(bounds[1, 1])
    f_step = (f_hi - f_lo) / (N_F - 1)
    f = f_lo + f_step * np.arange(N_F)
    J, K, L = np.meshgrid(np.arange(N_D), np.arange(N_DSTAR), np.arange(N_F), indexing="ij")
    keep = ds[K] >= DSTAR_OVER_D * d[J]
    J, K, L = J[keep], K[keep], L[keep]
    fD, dsD, dD = f[L], ds[K], d[J]
    M = fD[None, :] * np.exp(-np.outer(bu, dsD)) + (1.0 - fD[None, :]) * np.exp(-np.outer(bu, dD))
    nn = w @ (M * M)
    par = np.stack([fD, dsD, dD])
    # variance of a uniform distribution over the cell: linear f, log-spaced D* and D
    cvar = np.stack([np.full(fD.shape, f_step**2 / 12.0),
                     (dsD * (math.exp(ds_ratio / 2) - math.exp(-ds_ratio / 2)))**2 / 12.0,
                     (dD * (math.exp(d_ratio / 2) - math.exp(-d_ratio / 2)))**2 / 12.0])
    edge = np.zeros((3, fD.size), dtype=np.int8)
    for row, idx, n, floor_used in ((0, L, N_F, False),
                                    (1, K, N_DSTAR, bounds[2, 0] < GRID_FLOOR_DSTAR),
                                    (2, J, N_D, bounds[3, 0] < GRID_FLOOR_D)):
        if not floor_used:  # the lowest value is the bound only when no floor was applied
            edge[row, idx == 0] = -1
        edge[row, idx == n - 1] = 1
    return {
        "groups": groups.astype(np.int64),
        "w": w,
        "bu": bu,
        "M": np.ascontiguousarray(M),
        "nn": nn,
        "par": np.ascontiguousarray(par),
        "cvar": np.ascontiguousarray(cvar),
        "edge": np.ascontiguousarray(edge),
        "lnorm": -0.5 * np.log(nn),
    }


@jit_voxel
def debiased_means(Y, v, groups, w, sigma2, ybar):
    """Group means of ``sqrt(max(y² - sigma², 0))`` for voxel row ``v``; 0 when unusable.

    Returns
    -------
    float
        The largest raw group mean (NaN when a sample is not finite): the voxel is usable when
        it is > 0, the same test as the least-squares kernels make.
    """
    nu = ybar.shape[0]
    for u in range(nu):
        ybar[u] = 0.0
    raw_max = -math.inf
    for i in range(Y.shape[1]):
        yi = np.float64(Y[v, i])
        if not math.isfinite(yi):
            return math.nan
        ybar[groups[i]] += math.sqrt(max(yi * yi - sigma2, 0.0))
    for u in range(nu):
        ybar[u] /= w[u]
    # raw means for the usability test (a second pass keeps the first one branch-free)
    for u in range(nu):
        s = 0.0
        for i in range(Y.shape[1]):
            if groups[i] == u:
                s += np.float64(Y[v, i])
        if s / w[u] > raw_max:
            raw_max = s / w[u]
    return raw_max


@jit_voxel
def log_likelihoods(ybar, w, M, nn, inv_nn, logw, s0_lo, s0_hi, inv2s2, a, ll):
    """Profile log-likelihood plus log prior weight at every grid point; returns their maximum.

    ``a`` (n_g,) receives ``<y, m_g>_w`` (needed for S0), ``ll`` (n_g,) the log posterior up to
    a constant; ``inv_nn`` is ``1 / nn``. The products are accumulated b-value by b-value over
    contiguous rows of ``M`` (n_u, n_g), so the inner loop runs over grid points and
    vectorises.
    """
    ng = nn.shape[0]
    for g in range(ng):
        a[g] = 0.0
    for u in range(ybar.shape[0]):
        yu = w[u] * ybar[u]
        for g in range(ng):
            a[g] += yu * M[u, g]
    mx = -math.inf
    for g in range(ng):
        s = min(max(a[g] * inv_nn[g], s0_lo), s0_hi)
        ll[g] = (2.0 * s * a[g] - s * s * nn[g]) * inv2s2 + logw[g]
        mx = max(mx, ll[g])
    return mx


@jit_parallel
def em_likelihoods(Y, rows, groups, w, sigma2, M, nn, inv_nn, lnorm, s0_lo, s0_hi, n_chunks, L,
                   usable):
    """Relative likelihoods of the EM subsample: ``L[i, g] = exp(ll_g - max_g ll_g)`` for voxel
    row ``rows[i]`` of ``Y`` (float32 storage: these are weights in [0, 1]; float32 halves the
    largest array of the fit), ``ll_g`` including the S0 integral's ``lnorm`` (n_g,).
    ``usable[i]`` is False for voxels the fit would reject."""
    n = rows.shape[0]
    ng = nn.shape[0]
    nu = w.shape[0]
    inv2s2 = 0.5 / sigma2
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        ybar = np.empty(nu)
        a = np.empty(ng)
        ll = np.empty(ng)
        for i in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            raw_max = debiased_means(Y, rows[i], groups, w, sigma2, ybar)
            mx = log_likelihoods(ybar, w, M, nn, inv_nn, lnorm, s0_lo, s0_hi, inv2s2, a, ll)
            usable[i] = raw_max > 0.0 and math.isfinite(mx)
            for g in range(ng):
                d = ll[g] - mx
                L[i, g] = math.exp(d) if usable[i] and d > -LOG_CUTOFF else 0.0


@jit_voxel
def _weighted_row_sum(L, i, weights):
    """``sum_g weights[g] * L[i, g]`` in eight interleaved partial sums, added in a fixed order.

    Without the ``reassoc`` fast-math flag (see :mod:`fastivim.kernels._jit`) a single running
    sum is one long chain of dependent additions; eight explicit chains keep the FPU busy and
    give the same bits on every run.
    """
    ng = weights.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    n8 = ng - ng % 8
    for g in range(0, n8, 8):
        s0 += weights[g] * L[i, g]
        s1 += weights[g + 1] * L[i, g + 1]
        s2 += weights[g + 2] * L[i, g + 2]
        s3 += weights[g + 3] * L[i, g + 3]
        s4 += weights[g + 4] * L[i, g + 4]
        s5 += weights[g + 5] * L[i, g + 5]
        s6 += weights[g + 6] * L[i, g + 6]
        s7 += weights[g + 7] * L[i, g + 7]
    for g in range(n8, ng):
        s0 += weights[g] * L[i, g]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@jit_parallel
def em_iterations(L, usable, weights, n_iter, n_chunks, acc):
    """``n_iter`` EM updates of the grid weights ``weights`` (n_g,), in place.

    ``weights_g <- weights_g * mean_i(L[i, g] / sum_h weights_h L[i, h])`` over usable rows:
    the fixed-point iteration of the non-parametric maximum-likelihood prior. One pass over
    ``L`` per iteration: the rows are split into ``n_chunks`` fixed ranges (a constant, not the
    thread count), each chunk sums its rows' contributions in row order into its own row of
    ``acc`` (n_chunks, n_g), and the chunks are added in chunk order afterwards, so the result
    is the same on any number of threads.
    """
    n, ng = L.shape
    n_use = 0
    for i in range(n):
        if usable[i]:
            n_use += 1
    if n_use == 0:
        return
    n_chunks = max(1, min(n, n_chunks))
    for _ in range(n_iter):
        for c in prange(n_chunks):
            for g in range(ng):
                acc[c, g] = 0.0
            for i in range(c * n // n_chunks, (c + 1) * n // n_chunks):
                if not usable[i]:
                    continue
                s = _weighted_row_sum(L, i, weights)
                if s > 0.0:
                    r = 1.0 / s
                    for g in range(ng):
                        acc[c, g] += L[i, g] * r
        for g in range(ng):
            t = 0.0
            for c in range(n_chunks):
                t += acc[c, g]
            weights[g] *= t / n_use


@_jit_serial
def compact_columns(buf, n, ng, keep):
    """Keep the columns ``keep`` (sorted indices) of the row-major (n, ng) table stored at the
    start of the flat array ``buf``, in place: afterwards ``buf[:n * len(keep)]`` holds the
    (n, len(keep)) table. Rows move towards the start in row order, so a row is never
    overwritten before it is read (serial on purpose: the order is what makes it safe)."""
    nk = keep.shape[0]
    for i in range(n):
        src = i * ng
        dst = i * nk
        for j in range(nk):
            buf[dst + j] = buf[src + keep[j]]


@jit_voxel
def _raw_fit_measures(Y, v, groups, bu, S0, f, Ds, D):
    """(R², RMSE) of the model at (S0, f, Ds, D) (user units) over voxel row ``v``'s samples."""
    nb = Y.shape[1]
    mean = 0.0
    for i in range(nb):
        mean += np.float64(Y[v, i])
    mean /= nb
    ssr = 0.0
    sst = 0.0
    for i in range(nb):
        b = bu[groups[i]]
        yi = np.float64(Y[v, i])
        r = yi - S0 * (f * math.exp(-b * Ds) + (1.0 - f) * math.exp(-b * D))
        ssr += r * r
        sst += (yi - mean) * (yi - mean)
    r2 = 1.0 - ssr / sst if sst > 0.0 else math.nan
    return r2, math.sqrt(ssr / nb)


@jit_voxel
def posterior_voxel(Y, v, groups, w, bu, sigma2, M, nn, inv_nn, logw, par, cvar, edge, s0_lo,
                    s0_hi, ybar, a, ll, out, sd):
    """Posterior mean and SD of voxel row ``v`` over the grid; writes ``out[v]`` (6 columns as
    the least-squares kernels) and ``sd[v]`` (:data:`SD_COLUMNS`); returns the status.
    """
    raw_max = debiased_means(Y, v, groups, w, sigma2, ybar)
    if not raw_max > 0.0:
        return fail_voxel_sd(out, sd, v, st.BAD_INPUT)
    inv2s2 = 0.5 / sigma2
    mx = log_likelihoods(ybar, w, M, nn, inv_nn, logw, s0_lo, s0_hi, inv2s2, a, ll)
    if not math.isfinite(mx):
        return fail_voxel_sd(out, sd, v, st.NUMERICAL_FAILURE)
    # local accumulators (not an array): they stay in registers through the loop
    z0 = zs = zs2 = 0.0
    zf = zf2 = zds = zds2 = zd = zd2 = 0.0
    lo_f = hi_f = lo_ds = hi_ds = lo_d = hi_d = 0.0
    for g in range(nn.shape[0]):
        d = ll[g] - mx
        if d > -LOG_CUTOFF:
            p = math.exp(d)
            s = min(max(a[g] * inv_nn[g], s0_lo), s0_hi)
            z0 += p
            zs += p * s
            zs2 += p * (s * s + sigma2 * inv_nn[g])  # S0 given g is Gaussian, var sigma²/|m|²
            x = par[0, g]
            zf += p * x
            zf2 += p * (x * x + cvar[0, g])
            x = par[1, g]
            zds += p * x
            zds2 += p * (x * x + cvar[1, g])
            x = par[2, g]
            zd += p * x
            zd2 += p * (x * x + cvar[2, g])
            if edge[0, g] != 0 or edge[1, g] != 0 or edge[2, g] != 0:  # rare
                lo_f += p if edge[0, g] < 0 else 0.0
                hi_f += p if edge[0, g] > 0 else 0.0
                lo_ds += p if edge[1, g] < 0 else 0.0
                hi_ds += p if edge[1, g] > 0 else 0.0
                lo_d += p if edge[2, g] < 0 else 0.0
                hi_d += p if edge[2, g] > 0 else 0.0
    z = 1.0 / z0
    S0 = zs * z
    f = zf * z
    Ds = zds * z
    D = zd * z
    if not (math.isfinite(S0) and math.isfinite(f) and math.isfinite(Ds) and math.isfinite(D)):
        return fail_voxel_sd(out, sd, v, st.NUMERICAL_FAILURE)
    out[v, 0] = S0
    out[v, 1] = f
    out[v, 2] = Ds
    out[v, 3] = D
    sd[v, 0] = math.sqrt(max(zs2 * z - S0 * S0, 0.0))
    sd[v, 1] = math.sqrt(max(zf2 * z - f * f, 0.0))
    sd[v, 2] = math.sqrt(max(zds2 * z - Ds * Ds, 0.0))
    sd[v, 3] = math.sqrt(max(zd2 * z - D * D, 0.0))
    r2, rmse = _raw_fit_measures(Y, v, groups, bu, S0, f, Ds, D)  # float64, not the stored maps
    out[v, 4] = r2
    out[v, 5] = rmse
    edge_mass = max(max(lo_f, hi_f), max(max(lo_ds, hi_ds), max(lo_d, hi_d))) * z
    if edge_mass > EDGE_MASS:
        return st.AT_BOUND
    return st.OK


@jit_parallel
def posterior_volume(Y, groups, w, bu, sigma2, M, nn, inv_nn, logw, par, cvar, edge, s0_lo,
                     s0_hi, n_chunks, out, sd, status):
    """Posterior mean (``out``, (n_vox, 6) float32: S0, f, D_star, D, R², RMSE) and SD (``sd``,
    (n_vox, 4) float32) of every row of ``Y`` (n_vox, n_b), with ``status`` (n_vox,) uint8.

    ``M``, ``nn``, ``inv_nn = 1 / nn``, ``par``, ``cvar``, ``edge`` are the grid tables of
    :func:`make_bayes_tables` restricted to the grid points kept, ``logw`` (n_g,) their log
    prior weights plus ``lnorm`` (the S0 integral's term); ``sigma2`` the noise variance
    (input units squared).
    """
    n = Y.shape[0]
    ng = nn.shape[0]
    nu = w.shape[0]
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        ybar = np.empty(nu)
        a = np.empty(ng)
        ll = np.empty(ng)
        for v in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            status[v] = posterior_voxel(Y, v, groups, w, bu, sigma2, M, nn, inv_nn, logw, par,
                                        cvar, edge, s0_lo, s0_hi, ybar, a, ll, out, sd)
