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

The grid loops take :data:`LANES` voxels at a time (the layout of :mod:`fastivim.kernels.block`):
grid points outside, the block's voxels inside, so that LLVM vectorises over voxels while each
voxel's own sums still run over the grid points in order; ``exp`` is the branch-free
:func:`fastivim.kernels.vmath.vexp`. The results are those of the one-voxel form
(:func:`log_likelihoods`, then a sum over the grid) to the last bit of the float32 maps (measured
on 4 x 15,324 phantom voxels), at 3.4x less CPU time for the posterior (clinical11, SNR 10,
2,077 grid points).

Everything here is deterministic whatever the thread count: each voxel's row is written by one
thread, a voxel's result depends on its own data only (not on its lane or block), and every sum
runs sequentially in a fixed order (the EM's column sums run over voxels in index order inside
one thread per column block).
"""

import math

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from . import status as st
from ._jit import jit_block, jit_parallel, jit_serial, jit_voxel
from .vmath import vexp, vmax, vmin
from .voxel import fail_voxel_sd

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

#: Voxels evaluated together over the grid, one per lane: each loop over grid points has an
#: inner loop over the lanes, which LLVM vectorises (two AVX-512 vectors of float64), while each
#: voxel's own sums still run over the grid points in order. A partial block repeats its last
#: voxel, so that every lane loop runs its full, vectorised length.
LANES = 16

#: Rows of the posterior sums over the grid (``Z`` of :func:`lane_posterior_sums`): the
#: normaliser, first and second moments of S0, f, D_star, D, and the mass at each bound.
Z_NORM, Z_S0, Z_S02, Z_F, Z_F2, Z_DS, Z_DS2, Z_D, Z_D2 = range(9)
Z_EDGE = 9  #: then lower / upper bound mass of f, D_star, D (six rows)
N_SUMS = 15

#: Grid points per tile of the ``<y, m_g>`` products (:func:`lane_products`): the tile of
#: ``M`` (n_u x G_TILE) and of the lanes' sums (LANES x G_TILE, 16 KiB) stay in L1 cache.
G_TILE = 128


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
    """Log-likelihood plus ``logw`` at every grid point for one voxel; returns their maximum.

    The one-voxel form of :func:`lane_log_likelihoods` (same arithmetic, same order), kept as
    its readable definition: ``a`` (n_g,) receives ``<y, m_g>_w``, ``ll`` (n_g,) the log
    posterior up to a constant; ``inv_nn`` is ``1 / nn``.
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
        s = vmin(vmax(a[g] * inv_nn[g], s0_lo), s0_hi)
        ll[g] = (2.0 * s * a[g] - s * s * nn[g]) * inv2s2 + logw[g]
        mx = vmax(mx, ll[g])
    return mx


@jit_block
def lane_means(Y, rows, i0, n, groups, w, sigma2, ybar, YW, RAW):
    """Debiased group means of the voxels ``rows[i0 .. i0 + LANES]`` of ``Y``, one per lane.

    ``YW`` (n_u * LANES, indexed ``[u * LANES + lane]``) receives ``w_u * ybar_u`` (the
    weights of the ``<y, m_g>`` products), ``RAW`` (LANES,) the largest raw group mean (see
    :func:`debiased_means`: the lane is usable when it is > 0). Lanes at ``i0 + l >= n``
    repeat row ``rows[n - 1]``; ``ybar`` (n_u,) is scratch.
    """
    nu = ybar.shape[0]
    for lane in range(LANES):
        raw = debiased_means(Y, rows[vmin(i0 + lane, n - 1)], groups, w, sigma2, ybar)
        RAW[lane] = raw
        for u in range(nu):
            YW[u * LANES + lane] = w[u] * ybar[u]


@jit_block
def lane_products(YW, M, A):
    """``A[lane * n_g + g] = sum_u YW[u * LANES + lane] M[u, g]``: the ``<y, m_g>_w`` of every
    lane (lane-major), summed b-value by b-value from 0 as in :func:`log_likelihoods`.

    Tiles of :data:`G_TILE` grid points, so that a tile of ``M`` stays in L1 cache while all
    lanes use it; inside a tile the loop runs over contiguous grid points and vectorises. (With
    the lanes innermost instead, LLVM unrolls the 16-lane loop into scalar code and vectorises
    the grid loop with gathers and scatters: measured 5.7 ns per voxel and grid point against
    1.0.) Four b-values per pass over a tile, added one after the other (the same additions in
    the same order as one b-value per pass), so that each sum is loaded and stored a quarter as
    often: 1.09 -> 0.83 ns per voxel and grid point with 11 b-values, 1.67 -> 1.13 with 18.
    Tiles are addressed through views, whose indices LLVM can prove non-negative.
    """
    nu, ng = M.shape
    for tile in range((ng + G_TILE - 1) // G_TILE):
        g0 = tile * G_TILE
        g1 = g0 + vmin(G_TILE, ng - g0)
        for lane in range(LANES):
            At = A[lane * ng + g0:lane * ng + g1]
            for j in range(g1 - g0):
                At[j] = 0.0
        u = 0
        while u + 4 <= nu:
            M0 = M[u, g0:g1]
            M1 = M[u + 1, g0:g1]
            M2 = M[u + 2, g0:g1]
            M3 = M[u + 3, g0:g1]
            for lane in range(LANES):
                y0 = YW[u * LANES + lane]
                y1 = YW[(u + 1) * LANES + lane]
                y2 = YW[(u + 2) * LANES + lane]
                y3 = YW[(u + 3) * LANES + lane]
                At = A[lane * ng + g0:lane * ng + g1]
                for j in range(g1 - g0):
                    At[j] = (((At[j] + y0 * M0[j]) + y1 * M1[j]) + y2 * M2[j]) + y3 * M3[j]
            u += 4
        while u < nu:
            Mu = M[u, g0:g1]
            for lane in range(LANES):
                y = YW[u * LANES + lane]
                At = A[lane * ng + g0:lane * ng + g1]
                for j in range(g1 - g0):
                    At[j] += y * Mu[j]
            u += 1


@jit_block
def lane_transpose(A, ng, S):
    """``S[g * LANES + lane] = A[lane * ng + g]``: lane-major to grid point-major."""
    for lane in range(LANES):
        for g in range(ng):
            S[g * LANES + lane] = A[lane * ng + g]


@jit_block
def lane_log_likelihoods(nn, inv_nn, logw, s0_lo, s0_hi, inv2s2, S, LL, MX):
    """:func:`log_likelihoods` for the voxels of a lane block, from the products ``S``
    (n_g * LANES, grid point-major: ``[g * LANES + lane]``; see :func:`lane_products`).

    ``S`` is overwritten with the clipped S0 scale ``s_g`` of every lane, ``LL`` (n_g * LANES)
    receives the log posterior up to a constant, ``MX`` (LANES,) its maximum over the grid.
    """
    ng = nn.shape[0]
    for lane in range(LANES):
        MX[lane] = -math.inf
    for g in range(ng):
        n2 = nn[g]
        r = inv_nn[g]
        lw = logw[g]
        for lane in range(LANES):
            a = S[g * LANES + lane]
            s = vmin(vmax(a * r, s0_lo), s0_hi)
            x = (2.0 * s * a - s * s * n2) * inv2s2 + lw
            S[g * LANES + lane] = s
            LL[g * LANES + lane] = x
            MX[lane] = vmax(MX[lane], x)


@jit_block
def lane_grid_pass(YW, M, nn, inv_nn, logw, s0_lo, s0_hi, inv2s2, A, S, LL, MX):
    """Log posterior ``LL`` (n_g * LANES), S0 scales ``S`` and maxima ``MX`` of a lane block
    from its weighted means ``YW`` (:func:`lane_means`); ``A`` (n_g * LANES) is scratch."""
    ng = nn.shape[0]
    lane_products(YW, M, A)
    lane_transpose(A, ng, S)
    lane_log_likelihoods(nn, inv_nn, logw, s0_lo, s0_hi, inv2s2, S, LL, MX)


@jit_block
def lane_posterior_sums(S, LL, MX, inv_nn, par, cvar, edge, edge_any, sigma2, P, Z):
    """Posterior sums over the grid of every lane into ``Z`` (:data:`N_SUMS`, LANES).

    Terms below ``exp(-LOG_CUTOFF)`` of a lane's largest are zero. The second moments add each
    grid cell's own variance ``cvar`` (and S0's given the grid point, ``sigma² / |m_g|²``). The
    bound masses (rows from :data:`Z_EDGE`) are summed only at grid points where ``edge_any``
    is set, a test on the grid point alone, so that the lane loops stay branch-free; ``P``
    (LANES,) carries the terms to them.
    """
    ng = LL.shape[0] // LANES
    for k in range(N_SUMS):
        for lane in range(LANES):
            Z[k * LANES + lane] = 0.0
    for g in range(ng):
        vs = sigma2 * inv_nn[g]
        f = par[0, g]
        f2 = f * f + cvar[0, g]
        ds = par[1, g]
        ds2 = ds * ds + cvar[1, g]
        d = par[2, g]
        d2 = d * d + cvar[2, g]
        for lane in range(LANES):
            x = LL[g * LANES + lane] - MX[lane]
            p = vexp(x)
            p = p if x > -LOG_CUTOFF else 0.0
            s = S[g * LANES + lane]
            P[lane] = p
            Z[Z_NORM * LANES + lane] += p
            Z[Z_S0 * LANES + lane] += p * s
            Z[Z_S02 * LANES + lane] += p * (s * s + vs)
            Z[Z_F * LANES + lane] += p * f
            Z[Z_F2 * LANES + lane] += p * f2
            Z[Z_DS * LANES + lane] += p * ds
            Z[Z_DS2 * LANES + lane] += p * ds2
            Z[Z_D * LANES + lane] += p * d
            Z[Z_D2 * LANES + lane] += p * d2
        if edge_any[g]:
            e0 = 1.0 if edge[0, g] < 0 else 0.0
            e1 = 1.0 if edge[0, g] > 0 else 0.0
            e2 = 1.0 if edge[1, g] < 0 else 0.0
            e3 = 1.0 if edge[1, g] > 0 else 0.0
            e4 = 1.0 if edge[2, g] < 0 else 0.0
            e5 = 1.0 if edge[2, g] > 0 else 0.0
            for lane in range(LANES):
                p = P[lane]
                Z[Z_EDGE * LANES + lane] += p * e0
                Z[(Z_EDGE + 1) * LANES + lane] += p * e1
                Z[(Z_EDGE + 2) * LANES + lane] += p * e2
                Z[(Z_EDGE + 3) * LANES + lane] += p * e3
                Z[(Z_EDGE + 4) * LANES + lane] += p * e4
                Z[(Z_EDGE + 5) * LANES + lane] += p * e5


@jit_block
def lane_relative_likelihoods(LL, MX, RAW, USE):
    """``LL[g, l] <- exp(LL[g, l] - MX[l])`` (0 below ``exp(-LOG_CUTOFF)`` and for unusable
    lanes), in place; ``USE`` (LANES,) receives whether each lane is usable."""
    ng = LL.shape[0] // LANES
    for lane in range(LANES):
        USE[lane] = RAW[lane] > 0.0 and math.isfinite(MX[lane])
    for g in range(ng):
        for lane in range(LANES):
            x = LL[g * LANES + lane] - MX[lane]
            p = vexp(x)
            LL[g * LANES + lane] = p if (x > -LOG_CUTOFF) & USE[lane] else 0.0


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
    n_blocks = (n + LANES - 1) // LANES
    n_chunks = max(1, min(n_blocks, n_chunks))
    for c in prange(n_chunks):
        ybar = np.empty(nu)
        YW = np.empty(nu * LANES)
        RAW = np.empty(LANES)
        MX = np.empty(LANES)
        USE = np.empty(LANES, dtype=np.bool_)
        A = np.empty(ng * LANES)
        S = np.empty(ng * LANES)
        LL = np.empty(ng * LANES)
        for blk in range(c * n_blocks // n_chunks, (c + 1) * n_blocks // n_chunks):
            i0 = blk * LANES
            lane_means(Y, rows, i0, n, groups, w, sigma2, ybar, YW, RAW)
            lane_grid_pass(YW, M, nn, inv_nn, lnorm, s0_lo, s0_hi, inv2s2, A, S, LL, MX)
            lane_relative_likelihoods(LL, MX, RAW, USE)
            for lane in range(min(LANES, n - i0)):
                usable[i0 + lane] = USE[lane]
                for g in range(ng):
                    L[i0 + lane, g] = LL[g * LANES + lane]


@intrinsic
def _dot8_partials(typingctx, x, w, n8):
    """The eight interleaved partial sums ``s_k = sum_{g < n8, g % 8 == k} w[g] x[g]`` (k = 0..7)
    of a float32 row ``x`` and float64 weights ``w`` (both contiguous; ``n8`` a multiple of 8).

    One ``<8 x double>`` accumulator whose lane ``k`` adds the terms ``g = k, k + 8, ...`` in
    that order, each ``w[g] * x[g]`` fused into the addition (``contract``), exactly as eight
    scalar running sums compile: the same bits, a packed FMA per 8 terms instead of 8 scalar
    ones. LLVM does not vectorise the scalar form itself (it would have to reorder the sums,
    which :data:`fastivim.kernels._jit.FASTMATH_FLAGS` forbids).
    """
    if not (isinstance(x, types.Array) and x.ndim == 1 and x.layout == "C"
            and x.dtype == types.float32 and isinstance(w, types.Array) and w.ndim == 1
            and w.layout == "C" and w.dtype == types.float64 and isinstance(n8, types.Integer)):
        return None
    sig = types.UniTuple(types.float64, 8)(x, w, n8)

    def codegen(context, builder, signature, args):
        xa = context.make_array(signature.args[0])(context, builder, args[0])
        wa = context.make_array(signature.args[1])(context, builder, args[1])
        n = context.cast(builder, args[2], signature.args[2], types.int64)
        i64 = ir.IntType(64)
        v8d = ir.VectorType(ir.DoubleType(), 8)
        v8f = ir.VectorType(ir.FloatType(), 8)
        entry = builder.block
        head = builder.append_basic_block("dot8.head")
        body = builder.append_basic_block("dot8.body")
        done = builder.append_basic_block("dot8.done")
        builder.branch(head)
        builder.position_at_end(head)
        g = builder.phi(i64)
        acc = builder.phi(v8d)
        g.add_incoming(ir.Constant(i64, 0), entry)
        acc.add_incoming(ir.Constant(v8d, [0.0] * 8), entry)
        builder.cbranch(builder.icmp_signed("<", g, n), body, done)
        builder.position_at_end(body)
        px = builder.bitcast(builder.gep(xa.data, [g]), v8f.as_pointer())
        pw = builder.bitcast(builder.gep(wa.data, [g]), v8d.as_pointer())
        xv = builder.fpext(builder.load(px, align=4), v8d)
        wv = builder.load(pw, align=8)
        nacc = builder.fadd(acc, builder.fmul(wv, xv, flags=("contract",)), flags=("contract",))
        g.add_incoming(builder.add(g, ir.Constant(i64, 8)), body)
        acc.add_incoming(nacc, body)
        builder.branch(head)
        builder.position_at_end(done)
        parts = [builder.extract_element(acc, ir.Constant(ir.IntType(32), k)) for k in range(8)]
        return context.make_tuple(builder, signature.return_type, parts)

    return sig, codegen


@jit_voxel
def _weighted_row_sum(L, i, weights):
    """``sum_g weights[g] * L[i, g]`` in eight interleaved partial sums, added in a fixed order.

    Without the ``reassoc`` fast-math flag (see :mod:`fastivim.kernels._jit`) a single running
    sum is one long chain of dependent additions; eight interleaved chains (one packed
    accumulator, :func:`_dot8_partials`: 0.32 -> 0.19 ns per term against eight scalar sums,
    same bits) keep the FPU busy and give the same bits on every run.
    """
    ng = weights.shape[0]
    n8 = ng - ng % 8
    s0, s1, s2, s3, s4, s5, s6, s7 = _dot8_partials(L[i], weights, n8)
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


@jit_serial
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
def finish_posterior(Y, v, groups, bu, RAW, Z, lane, out, sd):
    """Write voxel row ``v``'s posterior mean (``out[v]``, 6 columns as the least-squares
    kernels) and SD (``sd[v]``, :data:`SD_COLUMNS`) from lane ``lane`` of the sums ``Z`` of
    :func:`lane_posterior_sums` and of ``RAW`` (:func:`lane_means`); return its status."""
    if not RAW[lane] > 0.0:
        return fail_voxel_sd(out, sd, v, st.BAD_INPUT)
    z = 1.0 / Z[Z_NORM * LANES + lane]
    S0 = Z[Z_S0 * LANES + lane] * z
    f = Z[Z_F * LANES + lane] * z
    Ds = Z[Z_DS * LANES + lane] * z
    D = Z[Z_D * LANES + lane] * z
    if not (math.isfinite(S0) and math.isfinite(f) and math.isfinite(Ds) and math.isfinite(D)):
        return fail_voxel_sd(out, sd, v, st.NUMERICAL_FAILURE)
    out[v, 0] = S0
    out[v, 1] = f
    out[v, 2] = Ds
    out[v, 3] = D
    sd[v, 0] = math.sqrt(max(Z[Z_S02 * LANES + lane] * z - S0 * S0, 0.0))
    sd[v, 1] = math.sqrt(max(Z[Z_F2 * LANES + lane] * z - f * f, 0.0))
    sd[v, 2] = math.sqrt(max(Z[Z_DS2 * LANES + lane] * z - Ds * Ds, 0.0))
    sd[v, 3] = math.sqrt(max(Z[Z_D2 * LANES + lane] * z - D * D, 0.0))
    r2, rmse = _raw_fit_measures(Y, v, groups, bu, S0, f, Ds, D)  # float64, not the stored maps
    out[v, 4] = r2
    out[v, 5] = rmse
    edge_mass = 0.0
    for k in range(Z_EDGE, N_SUMS):
        edge_mass = max(edge_mass, Z[k * LANES + lane])
    if edge_mass * z > EDGE_MASS:
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
    (input units squared). Voxels go through the grid :data:`LANES` at a time; each voxel's
    result depends on its own row only, whatever the block or thread it falls in.
    """
    n = Y.shape[0]
    ng = nn.shape[0]
    nu = w.shape[0]
    rows = np.arange(n)
    edge_any = np.empty(ng, dtype=np.bool_)
    for g in range(ng):
        edge_any[g] = edge[0, g] != 0 or edge[1, g] != 0 or edge[2, g] != 0
    inv2s2 = 0.5 / sigma2
    n_blocks = (n + LANES - 1) // LANES
    n_chunks = max(1, min(n_blocks, n_chunks))
    for c in prange(n_chunks):
        ybar = np.empty(nu)
        YW = np.empty(nu * LANES)
        RAW = np.empty(LANES)
        MX = np.empty(LANES)
        P = np.empty(LANES)
        Z = np.empty(N_SUMS * LANES)
        A = np.empty(ng * LANES)
        S = np.empty(ng * LANES)
        LL = np.empty(ng * LANES)
        for blk in range(c * n_blocks // n_chunks, (c + 1) * n_blocks // n_chunks):
            i0 = blk * LANES
            lane_means(Y, rows, i0, n, groups, w, sigma2, ybar, YW, RAW)
            lane_grid_pass(YW, M, nn, inv_nn, logw, s0_lo, s0_hi, inv2s2, A, S, LL, MX)
            lane_posterior_sums(S, LL, MX, inv_nn, par, cvar, edge, edge_any, sigma2, P, Z)
            for lane in range(min(LANES, n - i0)):
                status[i0 + lane] = finish_posterior(Y, i0 + lane, groups, bu, RAW, Z, lane,
                                                     out, sd)
