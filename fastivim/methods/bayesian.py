"""The ``bayesian`` method: grid empirical Bayes (kernels in :mod:`fastivim.kernels.bayes`).

A grid over (D, D_star, f) inside the bounds gives each voxel a likelihood with S0 integrated
out; one noise sigma for the volume comes from the ``full`` fit of a subsample; a prior (a
weight per grid point) is learned by EM on a seeded subsample; each voxel's posterior mean is
the map and its posterior SD the uncertainty. Deterministic for a seed on any thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..kernels import bayes
from ..kernels import status as st
from ..kernels.driver import chunk_count
from ..kernels.tables import METHOD_FULL
from ..model import bounds_array
from . import Method, MethodOutput
from ._blocks import run_in_float64_blocks
from .least_squares import OUTPUT_COLUMNS, run_kernel

#: Bayesian fit: voxels in the EM subsample that learns the prior (drawn with the ``seed``).
EM_VOXELS = 4000
#: Bayesian fit: EM iterations from a uniform start, in stages of these lengths (100 in all:
#: on the tissue phantom 300 gave the same RMSE and coverage to within 0.01);
#: after each stage the grid points whose weight fell below EM_PRUNE of the largest are
#: dropped. Most of the grid has no support in the data and falls below that within a few
#: iterations; dropping it early is what makes the EM cheap (each iteration reads the whole
#: subsample x grid likelihood table twice).
EM_STAGES = (3, 7, 15, 25, 50)
#: (1e-8 until issue 17: at 1e-5 the EM keeps ~20% fewer columns in its later stages, which
#: cuts the fit's CPU time by ~20% on a 31,968-voxel mask (one thread, best of 3: osipi18
#: 0.52-0.60 -> 0.41-0.45 s, clinical11 0.60-0.77 -> 0.47-0.53 s) while the RMSE and coverage
#: of f, D_star and D on that mask are the same to 4 significant digits; the points it drops
#: early lie far below PRIOR_PRUNE, which drops them before the posteriors anyway.)
EM_PRUNE = 1e-5
#: Bayesian fit: the EM subsample is summed in this many fixed row ranges (then in range
#: order), whatever the thread count, so the prior is the same bits on any number of threads.
EM_CHUNKS = 16
#: Bayesian fit: grid points whose learned prior weight is below this share of the largest are
#: dropped before the per-voxel posteriors (measured on the tissue phantom at SNR 10 and 20:
#: 1e-6, 1e-4 and 1e-3 give the same RMSE and coverage to 0.005; 1e-4 keeps 1255 of 7520
#: points at SNR 10 where 1e-6 keeps 1734).
PRIOR_PRUNE = 1e-4
#: Bayesian fit: with fewer usable voxels than this in the subsample, no prior is learned and
#: the weak prior is used: uniform over the grid (uniform in log D, log D_star and f).
MIN_EM_VOXELS = 200
#: Bayesian fit: the noise sigma never goes below this share of the median signal scale
#: (noise-free data would otherwise give sigma = 0 and a degenerate likelihood).
SIGMA_FLOOR = 1e-6


def _chi2_median(k: int) -> float:
    """Median of a chi-squared variable with ``k`` degrees of freedom (Wilson–Hilferty; within
    0.3% of the exact value for k >= 2, 3.5% for k = 1)."""
    return k * (1.0 - 2.0 / (9.0 * k)) ** 3


def _subsample(n: int, seed) -> np.ndarray:
    """Sorted rows of the EM subsample: every row when ``n <= EM_VOXELS``, else a draw
    without replacement from ``numpy.random.default_rng(seed)`` (deterministic for a seed)."""
    if n <= EM_VOXELS:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=EM_VOXELS, replace=False)).astype(np.int64)


def _noise_variance(Y, rows, b, bounds, b_threshold) -> float:
    """One noise variance for the volume from the full least-squares fit of the subsample:
    the median residual sum of squares over the chi-squared median with ``n_b - 4`` degrees of
    freedom (robust to the voxels that fit badly). NaN when no voxel could be fitted."""
    out, _ = run_kernel(np.ascontiguousarray(Y[rows]), METHOD_FULL, b, bounds, b_threshold,
                        False)
    rss = out[:, 5].astype(np.float64) ** 2 * b.size
    rss = rss[np.isfinite(rss)]
    if rss.size == 0:
        return math.nan
    s2 = float(np.median(rss)) / _chi2_median(max(b.size - 4, 1))
    scale = np.nanmedian(out[:, 0].astype(np.float64))
    floor = (SIGMA_FLOOR * scale) ** 2 if np.isfinite(scale) and scale > 0 else 0.0
    return max(s2, floor, np.finfo(np.float64).tiny)


def _learn_prior(Y, rows, t, sigma2, s0_bounds):
    """Grid weights (n_g,) learned by EM on the subsample, or None when fewer than
    :data:`MIN_EM_VOXELS` of its voxels are usable."""
    ng = t["nn"].size
    n = rows.size
    buf = np.empty(n * ng, dtype=np.float32)  # the likelihood table, shrunk in place below
    usable = np.empty(n, dtype=np.bool_)
    Ys = np.array(Y[rows], dtype=np.float64, order="C")  # the subsample only: small
    bayes.em_likelihoods(Ys, np.arange(n, dtype=np.int64), t["groups"], t["w"], sigma2, t["M"],
                         t["nn"], 1.0 / t["nn"], t["lnorm"], *s0_bounds, chunk_count(n),
                         buf.reshape(n, ng), usable)
    if int(usable.sum()) < MIN_EM_VOXELS:
        return None
    weights = np.full(ng, 1.0 / ng)
    index = np.arange(ng)
    acc = np.empty((EM_CHUNKS, ng))
    for n_iter in EM_STAGES:
        k = weights.size
        bayes.em_iterations(buf[:n * k].reshape(n, k), usable, weights, n_iter, EM_CHUNKS, acc)
        keep = np.flatnonzero(weights >= EM_PRUNE * weights.max())
        if keep.size < k:
            bayes.compact_columns(buf, n, k, keep)
            weights = weights[keep]
            index = index[keep]
    full = np.zeros(ng)
    full[index] = weights
    return full / full.sum()


def _usable_rows(Y, groups, w) -> np.ndarray:
    """(n_vox,) bool: every sample finite and some b-value's mean signal > 0 (the kernels'
    test for status BAD_INPUT)."""
    Y = np.asarray(Y, dtype=np.float64)
    sums = np.zeros((Y.shape[0], w.size))
    np.add.at(sums.T, groups, Y.T)
    with np.errstate(invalid="ignore"):
        return np.isfinite(Y).all(axis=1) & ((sums / w).max(axis=1) > 0)


def empty_outputs(n: int):
    """``out`` (n, 6) and ``sd`` (n, 4) float32 NaN, ``status`` (n,) uint8 numerical failure:
    what a voxel keeps unless a fit overwrites it."""
    return (np.full((n, len(OUTPUT_COLUMNS)), np.nan, dtype=np.float32),
            np.full((n, len(bayes.SD_COLUMNS)), np.nan, dtype=np.float32),
            np.full(n, st.NUMERICAL_FAILURE, dtype=np.uint8))


@dataclass
class Posterior:
    """What every voxel's posterior needs, learned once per volume (:func:`prepare_posterior`).

    ``tables`` are the grid tables (:func:`fastivim.kernels.bayes.make_bayes_tables`);
    ``sigma2`` the noise variance (signal units²; NaN when no voxel of the subsample could be
    fitted, then nothing else is set); ``weights`` (n_g,) the prior over the whole grid;
    ``prior`` ``"empirical"`` or ``"weak"``; ``keep`` (n_g,) bool the grid points whose weight
    is at least :data:`PRIOR_PRUNE` of the largest; ``s0_bounds`` (lower, upper) for S0.
    """

    tables: dict
    sigma2: float
    weights: np.ndarray | None = None
    prior: str | None = None
    keep: np.ndarray | None = None
    s0_bounds: tuple = ()

    def kernel_args(self) -> tuple:
        """The arguments of :func:`fastivim.kernels.bayes.posterior_volume` between the signal
        and the chunk count (grid pruned to ``keep``)."""
        t, keep = self.tables, self.keep
        return (t["groups"], t["w"], t["bu"], self.sigma2, np.ascontiguousarray(t["M"][:, keep]),
                t["nn"][keep], 1.0 / t["nn"][keep],
                np.log(self.weights[keep]) + t["lnorm"][keep],
                np.ascontiguousarray(t["par"][:, keep]), np.ascontiguousarray(t["cvar"][:, keep]),
                np.ascontiguousarray(t["edge"][:, keep]), *self.s0_bounds)

    def unfitted_status(self, Y) -> np.ndarray:
        """Status of every voxel when there is no noise estimate: bad input reported as such
        (the kernels' test: a non-finite sample, or no group mean > 0), every other voxel as a
        numerical failure."""
        return np.where(_usable_rows(Y, self.tables["groups"], self.tables["w"]),
                        st.NUMERICAL_FAILURE, st.BAD_INPUT).astype(np.uint8)


def prepare_posterior(Y, b, bounds, b_threshold, seed, sigma2=None) -> Posterior:
    """The grid, the noise variance and the prior learned from the seeded subsample of the
    (n_vox, n_b) matrix ``Y`` (shared by the ``bayesian`` and ``spatial`` methods).

    ``sigma2`` (signal units²) replaces the estimate from the ``full`` fit of the subsample:
    :func:`fastivim.compiling.compile_kernels` compiles this method's kernels with a known
    noise while the ``full`` kernel compiles in another process.
    """
    barr = bounds_array(bounds)
    t = bayes.make_bayes_tables(b, barr)
    rows = _subsample(Y.shape[0], seed)
    if sigma2 is None:
        sigma2 = _noise_variance(Y, rows, b, bounds, b_threshold)
    if not math.isfinite(sigma2):
        return Posterior(t, math.nan)
    s0_bounds = (float(barr[0, 0]), float(barr[0, 1]))
    weights = _learn_prior(Y, rows, t, sigma2, s0_bounds)
    prior = "empirical" if weights is not None else "weak"
    if weights is None:
        weights = np.full(t["nn"].size, 1.0 / t["nn"].size)
    keep = weights >= PRIOR_PRUNE * weights.max()
    return Posterior(t, sigma2, weights, prior, keep, s0_bounds)


def _run_bayesian(Y, b, bounds, b_threshold, seed, progress):
    """Grid empirical-Bayes fit of a (n_vox, n_b) matrix (see :mod:`fastivim.kernels.bayes`).

    Returns ``out`` (n_vox, 6) and ``sd`` (n_vox, 4) float32, ``status`` uint8 and the extra
    result fields (``prior``, ``noise_sigma``).
    """
    out, sd, status = empty_outputs(Y.shape[0])
    if Y.shape[0] == 0:
        return out, status, sd, {"prior": None, "noise_sigma": None}
    post = prepare_posterior(Y, b, bounds, b_threshold, seed)
    if not math.isfinite(post.sigma2):
        status[:] = post.unfitted_status(Y)
        return out, status, sd, {"prior": None, "noise_sigma": None}
    posteriors(Y, post, out, sd, status, progress)
    return out, status, sd, {"prior": post.prior, "noise_sigma": math.sqrt(post.sigma2)}


def posteriors(Y, post: Posterior, out, sd, status, progress=False) -> None:
    """Every row's posterior mean into ``out`` (n_vox, 6), SDs into ``sd`` (n_vox, 4), codes
    into ``status`` (n_vox,), block by block in float64."""
    args = post.kernel_args()

    def fit_block(a, z, Y64):
        bayes.posterior_volume(Y64, *args, chunk_count(z - a), out[a:z], sd[a:z], status[a:z])

    run_in_float64_blocks(Y, fit_block, progress)


def run(Y, req):
    """``run(Y, request)`` of the registry: the posterior maps and SDs of every row of ``Y``."""
    out, status, sd, extra = _run_bayesian(Y, req.b, req.bounds, req.b_threshold, req.seed,
                                           req.progress)
    return MethodOutput(out, status, sd, extra)


METHOD = Method(name="bayesian", needs="voxels", run=run, sd="always", models=("ivim",),
                extra_fields=("prior", "noise_sigma"))
