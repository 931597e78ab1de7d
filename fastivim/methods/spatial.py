"""The ``spatial`` method: each voxel's local tissue from its adaptive neighbourhood.

Kernels in :mod:`fastivim.kernels.spatial` (method and equations there). This module holds
the Python side: the noise, grid and prior (those of :mod:`.bayesian`), pass 1 (the per-voxel
posterior of ``bayesian``), the neighbourhood in mm from the voxel sizes, the within-tissue
variation, the second pass's tables, and the second pass. It needs a volume: the mask, the
spatial shape (2-D or 3-D) and the voxel sizes. Deterministic for a seed on any thread count.
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels import bayes, spatial
from ..kernels import status as st
from ..kernels.driver import chunk_count
from ..model import bounds_array
from . import Method, MethodOutput
from ._blocks import float64_rows, run_in_blocks
from .bayesian import empty_outputs, posteriors, prepare_posterior

#: Neighbourhood radius, mm: every voxel whose centre lies within it (1.5 x 1.5 x 4 mm voxels:
#: 3 voxels in-plane, the adjacent slices' 5 nearest).
RADIUS_MM = 4.5

#: Bandwidth ``lambda`` of the adaptive weights ``w = min(1, 2 (1 - d² / lambda))``, ``d²`` the
#: statistical distance (summed over f, log D_star, log D) between two voxels' pass-1
#: posteriors: full weight up to ``lambda / 2``, none beyond ``lambda`` (the kernel of
#: propagation-separation). Between neighbours of one tissue d² is below 1.8 for 95% of pairs at
#: SNR 20 (below 3.0 at SNR 30), between a lesion voxel and its organ's neighbours its median is
#: 2.7 at SNR 20 and 59 at SNR 30 (clinical11, 144 x 144 x 12 lesion phantom). The trade-off
#: (smaller: more lesion contrast, less accuracy) is tabulated in the README.
BANDWIDTH = 3.0

#: f's within-tissue variation is relative: its variance is ``tau² (fbar² + F_FLOOR²)``.
F_FLOOR = 0.02

#: Median of a chi-squared variable with one degree of freedom.
CHI2_1_MEDIAN = 0.45493642311957283

#: Rounds of pass 2 (propagation-separation): a second round's weights compare the first
#: round's pooled estimates, whose SDs are several times smaller than one voxel's. On 2 slices
#: it kept more lesion contrast (clinical11 SNR 20: f 0.76 -> 0.83, D 0.74 -> 0.77), but on the
#: 144 x 144 x 12 bench it did not (f 0.64 -> 0.71, D 0.60 -> 0.70, the smallest lesions still
#: 0.2) and cost accuracy (pooled f 0.23 -> 0.28; muscle f 1.04-1.14x bayesian's) and 1.5x the
#: time: one round.
ROUNDS = 1

#: At most this many voxels (with their nearest neighbours) enter the estimate of the variation.
TAU_PAIRS = 20000

#: Least within-tissue variation (relative SD) assumed for f, D_star and D: a voxel differs from
#: its neighbourhood's tissue by at least this much even where the noise hides it (at SNR
#: 20-30 it always does: the data-driven estimate falls below it). f varies more than D
#: between voxels of one tissue (perfusion is heterogeneous), and f's variation also stands for
#: the neighbours of a similar tissue that no voxel's data can tell apart (an organ's edge
#: against muscle), whose f the pooled estimate takes in.
TAU_FLOOR = np.array([0.10, 0.10, 0.05])


def neighbourhood(voxel_size, radius_mm=RADIUS_MM):
    """Offsets (K, 3) int64 of the voxels within ``radius_mm`` of a voxel (itself excluded),
    their distance class (K,) int64 (offsets at the same distance share one), and the distance
    (mm) of each class.

    ``voxel_size`` gives mm per axis (1 to 3 values; missing axes have no neighbours)."""
    vs = [float(v) for v in voxel_size] + [math.inf] * (3 - len(voxel_size))
    reach = [int(math.floor(radius_mm / v)) if math.isfinite(v) else 0 for v in vs]
    offs, dist = [], []
    for i in range(-reach[0], reach[0] + 1):
        for j in range(-reach[1], reach[1] + 1):
            for k in range(-reach[2], reach[2] + 1):
                if i == j == k == 0:
                    continue
                d = math.sqrt(sum((o * v) ** 2 for o, v in zip((i, j, k), vs, strict=True)
                                  if o))
                if d <= radius_mm + 1e-9:
                    offs.append((i, j, k))
                    dist.append(round(d, 6))
    classes = sorted(set(dist))
    oclass = np.array([classes.index(d) for d in dist], dtype=np.int64)
    return (np.array(offs, dtype=np.int64).reshape(-1, 3), oclass,
            np.array(classes, dtype=np.float64))


def learn_variation(out1, sd1, ok, coords, vidx, offsets):
    """Within-tissue variation ``tau²`` (3,) of f (relative to ``f² + F_FLOOR²``), D_star and D
    (relative) from the pass-1 estimates of adjacent voxel pairs.

    For two voxels of one tissue the difference of their estimates has variance ``sd_u² + sd_v²
    + 2 tau² s`` (``s`` the squared scale); ``tau²`` is set so that the median of ``diff² /
    (sd_u² + sd_v² + 2 tau² s)`` is the chi-squared median, a robust moment equation (organ
    edges and lesions, a minority of the pairs, move it little) whose solution is the median of
    ``(diff² / 0.455 - sd_u² - sd_v²) / (2 s)``, floored at :data:`TAU_FLOOR`². Pairs: each
    voxel (every ``k``-th, at most :data:`TAU_PAIRS`) and its nearest neighbours.
    """
    tau2 = TAU_FLOOR**2
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        return tau2
    rows = rows[::max(1, rows.size // TAU_PAIRS)]
    shape = np.array(vidx.shape)
    dist = np.abs(offsets).sum(axis=1)
    ts = [[], [], []]
    for o in offsets[(dist == 1) & (np.sum(offsets, axis=1) > 0)]:
        cc = coords[rows] + o
        inside = np.all((cc >= 0) & (cc < shape), axis=1)
        u = np.full(rows.size, -1)
        u[inside] = vidx[tuple(cc[inside].T)]
        good = u >= 0
        good[good] = ok[u[good]]
        v, u = rows[good], u[good]
        for j in range(3):
            a = out1[u, j + 1].astype(np.float64)
            b = out1[v, j + 1].astype(np.float64)
            sa = sd1[u, j + 1].astype(np.float64)
            sb = sd1[v, j + 1].astype(np.float64)
            scale2 = (0.25 * (a + b) ** 2 + F_FLOOR**2) if j == 0 else a * b
            ts[j].append(((a - b) ** 2 / CHI2_1_MEDIAN - sa**2 - sb**2) / (2.0 * scale2))
    for j in range(3):
        if ts[j]:
            tau2[j] = max(float(np.median(np.concatenate(ts[j]))), TAU_FLOOR[j] ** 2)
    return tau2


def run_spatial(Y, mask, spatial_shape, voxel_size, b, bounds, b_threshold, seed,
                radius_mm=RADIUS_MM, bandwidth=BANDWIDTH, rounds=None, progress=False):
    """Spatial fit of the mask's voxels ``Y`` (n_vox, n_b, mask order, any real dtype; used as
    one float64 copy) of a volume.

    Returns ``out`` (n_vox, 6), ``sd`` (n_vox, 4) float32, ``status`` uint8 and the extra result
    fields (``prior``, ``noise_sigma``).
    """
    n = Y.shape[0]
    out, sd, status = empty_outputs(n)
    none = {"prior": None, "noise_sigma": None}
    if n == 0:
        return out, status, sd, none
    # writeable float64 once, whatever the input (a copy unless it is that already): pass 2
    # reads any voxel's neighbours, and one compile of each kernel serves every input dtype
    Y = float64_rows(Y, 0, n)
    barr = bounds_array(bounds)
    post = prepare_posterior(Y, b, bounds, b_threshold, seed)
    if not math.isfinite(post.sigma2):
        status[:] = post.unfitted_status(Y)
        return out, status, sd, none
    t, sigma2, weights, prior = post.tables, post.sigma2, post.weights, post.prior
    # pass 1: each voxel's own posterior (the bayesian method's)
    out1 = np.empty((n, 6), dtype=np.float32)
    sd1 = np.empty((n, 4), dtype=np.float32)
    status1 = np.empty(n, dtype=np.uint8)
    posteriors(Y, post, out1, sd1, status1, progress)
    ok = np.isfinite(out1[:, :4]).all(axis=1) & (sd1[:, 1:] > 0).all(axis=1)
    YB = np.empty((n, t["w"].size + 1))
    spatial.weighted_means(Y, t["groups"], t["w"], sigma2, chunk_count(n), YB)
    # the neighbourhood in mm and the within-tissue variation
    shape3 = tuple(spatial_shape) + (1,) * (3 - len(spatial_shape))
    vidx = np.full(shape3, -1, dtype=np.int64)
    m3 = np.ones(shape3, dtype=bool) if mask is None else np.asarray(mask).reshape(shape3)
    vidx[m3] = np.arange(n)
    coords = np.ascontiguousarray(np.argwhere(m3).astype(np.int64))
    offsets, _, _ = neighbourhood(voxel_size, radius_mm)
    tau2 = learn_variation(out1, sd1, ok, coords, vidx, offsets)
    # pass 2: the posterior of each voxel's local tissue
    tb = spatial_tables(t, weights, barr)
    nsum = np.empty(n, dtype=np.float32)
    for r in range(ROUNDS if rounds is None else rounds):
        if r:  # the next round's weights compare the previous round's estimates
            out1, sd1 = out.copy(), sd.copy()
            ok = ok & (status != st.BAD_INPUT) & np.isfinite(out1[:, :4]).all(axis=1)
        args2 = (Y, YB, t["groups"], t["w"], t["bu"], sigma2, tb, out1, sd1,
                 distance_features(out1, sd1, ok), ok, coords, vidx, offsets, 1.0 / bandwidth,
                 tau2, F_FLOOR**2)

        def pass2(a, z, args2=args2):
            spatial.spatial_posterior(*args2, a, z, chunk_count(z - a), out, sd, status, nsum)

        run_in_blocks(n, pass2, progress)
    return out, status, sd, {"prior": prior, "noise_sigma": math.sqrt(sigma2),
                             "_tau2": tau2, "_nsum": nsum}


#: The fine D grid of the second pass has this many points per step of the Bayesian grid's.
D_REFINE = 4

#: The D_star grid of the second pass has this many points per step of the Bayesian grid's.
DSTAR_REFINE = 1

#: The second pass's prior is the learned one to this power: a neighbourhood's pooled
#: likelihood is much sharper than one voxel's, and a flatter prior lets it speak where the
#: learned prior, fitted to single voxels' noise, has little mass (a small organ, a lesion).
PRIOR_POWER = 1.0

#: Prior weights of (D, D_star) pairs below this share of the largest are raised to it, so that
#: the pooled likelihood can reach any pair with D_star >= 2 D.
PRIOR_FLOOR = 1e-6


def spatial_tables(t, weights, barr):
    """:class:`fastivim.kernels.spatial.SpatialTables` from the Bayesian grid tables ``t``
    (:func:`fastivim.kernels.bayes.make_bayes_tables`), its learned ``weights`` (n_g,) and the
    bounds ``barr`` (4, 2)."""
    par = t["par"]
    bu, w = t["bu"], t["w"]
    dc = np.unique(par[2])
    ds = np.unique(par[1])
    # the prior summed over f, on the (D, D_star) grid
    W = np.zeros((dc.size, ds.size))
    np.add.at(W, (np.searchsorted(dc, par[2]), np.searchsorted(ds, par[1])), weights)
    lstep = math.log(dc[1] / dc[0]) if dc.size > 1 else 0.1
    logd = math.log(dc[0]) + (lstep / D_REFINE) * np.arange((dc.size - 1) * D_REFINE + 1)
    dF = np.exp(logd)
    hs = math.log(ds[1] / ds[0]) / DSTAR_REFINE if ds.size > 1 else 0.0
    logds = math.log(ds[0]) + hs * np.arange((ds.size - 1) * DSTAR_REFINE + 1)
    Wd = np.empty((dF.size, ds.size))
    for k in range(ds.size):
        Wd[:, k] = np.interp(logd, np.log(dc), W[:, k])
    Wf = np.empty((dF.size, logds.size))
    for j in range(dF.size):
        Wf[j] = np.interp(logds, np.log(ds), Wd[j])
    ds = np.exp(logds)
    Wf = np.maximum(Wf, PRIOR_FLOOR * Wf.max())
    LP = PRIOR_POWER * np.log(Wf / Wf.max())
    ED = np.exp(-np.outer(dF, bu))
    ES = np.exp(-np.outer(ds, bu))
    g11 = ((ED * ED) @ w)[:, None]
    g22 = ((ES * ES) @ w)[None, :]
    g12 = (ED * w) @ ES.T
    det = g11 * g22 - g12**2
    bad = (ds[None, :] < bayes.DSTAR_OVER_D * dF[:, None]) | (det <= 1e-9 * g11 * g22)
    LP[bad] = -np.inf
    det = np.where(bad, 1.0, det)
    GI = np.stack([g22 / det + 0 * g12, -g12 / det, g11 / det + 0 * g12, -0.5 * np.log(det)],
                  axis=-1)
    h = lstep / D_REFINE
    return spatial.SpatialTables(
        dF=dF, dvar=(dF * (math.exp(h / 2) - math.exp(-h / 2))) ** 2 / 12.0,
        logd0=float(logd[0]), dstep=float(h), ED=np.ascontiguousarray(ED),
        ds=ds, dsvar=(ds * (math.exp(hs / 2) - math.exp(-hs / 2))) ** 2 / 12.0,
        ES=np.ascontiguousarray(ES), GI=np.ascontiguousarray(GI),
        LP=np.ascontiguousarray(LP), f_lo=float(barr[1, 0]), f_hi=float(barr[1, 1]),
        ds_lo_is_bound=bool(barr[2, 0] >= bayes.GRID_FLOOR_DSTAR),
        d_lo_is_bound=bool(barr[3, 0] >= bayes.GRID_FLOOR_D))


def distance_features(out1, sd1, ok):
    """(n_vox, 6) float64: f, log D_star, log D of the pass-1 means and the variances of those
    features (``sd²`` for f, ``(sd / value)²`` for the logs), what the adaptive weights compare;
    rows that are not ``ok`` hold 1 (they are never read)."""
    FS = np.ones((out1.shape[0], 6))
    m = out1[ok, 1:4].astype(np.float64)
    s = sd1[ok, 1:4].astype(np.float64)
    FS[ok, 0] = m[:, 0]
    FS[ok, 3] = s[:, 0] ** 2
    FS[ok, 1:3] = np.log(m[:, 1:])
    FS[ok, 4:6] = (s[:, 1:] / m[:, 1:]) ** 2
    return FS


#: Voxel size (mm) assumed along each axis when the caller gives none.
DEFAULT_VOXEL_SIZE = 1.0


def check_volume(spatial_shape, voxel_sizes):
    """The voxel sizes (mm, one per spatial axis) of a volume fit; ValueError when the spatial
    shape is not 2-D or 3-D or the sizes are not positive finite numbers, one per axis."""
    nd = len(spatial_shape)
    if nd not in (2, 3):
        raise ValueError(f"method 'spatial' needs a 2-D or 3-D volume (signal of shape "
                         f"(X, Y[, Z], n_b)), got spatial shape {tuple(spatial_shape)}")
    if voxel_sizes is None:
        return (DEFAULT_VOXEL_SIZE,) * nd
    try:
        vs = tuple(float(v) for v in voxel_sizes)
    except (TypeError, ValueError):
        raise ValueError(f"voxel_sizes must be numbers (mm), got {voxel_sizes!r}") from None
    if len(vs) < nd or not all(math.isfinite(v) and v > 0 for v in vs[:nd]):
        raise ValueError(f"voxel_sizes must give a positive size in mm for each of the "
                         f"{nd} spatial axes, got {voxel_sizes!r}")
    return vs[:nd]


def run(Y, req):
    """``run(Y, request)`` of the registry: the spatial maps and SDs of the mask's voxels."""
    if req.spatial is None:
        raise ValueError("method 'spatial' needs a volume")
    voxel_sizes = check_volume(req.spatial, req.voxel_sizes)
    out, status, sd, extra = run_spatial(Y, req.mask, req.spatial, voxel_sizes, req.b,
                                         req.bounds, req.b_threshold, req.seed,
                                         progress=req.progress)
    return MethodOutput(out, status, sd, {"prior": extra["prior"],
                                          "noise_sigma": extra["noise_sigma"]})


METHOD = Method(name="spatial", needs="volume", run=run, sd="always", models=("ivim",),
                extra_fields=("prior", "noise_sigma"))
