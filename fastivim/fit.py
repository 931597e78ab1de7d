"""The Python face of the kernels: validate, coerce, mask, flatten, fit, unflatten.

Data flow: signal (..., n_b) → validate → mask → C-contiguous (n_vox, n_b) → compiled kernel →
(n_vox, 6) + status → maps of shape ``signal.shape[:-1]`` (float32; NaN where not fitted).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .kernels import bayes, ensure_fresh_cache, simplified, uncertainty
from .kernels import status as st
from .kernels.block import fit_volume_block
from .kernels.driver import chunk_count, fit_volume
from .kernels.output import split_columns
from .kernels.tables import METHOD_FULL, METHOD_SEGMENTED, make_settings, make_tables
from .model import METHODS as _METHOD_NAMES
from .model import MODELS, PARAM_NAMES, bounds_array, float32_bounds
from .options import FitOptions

#: Code of the Bayesian method (it has its own kernels, not a branch of ``fit_volume``).
METHOD_BAYESIAN = 2

#: Method names accepted by :func:`fit_ivim` and :func:`fit_voxels`, with their kernel code.
#: The names and their descriptions are declared in :data:`fastivim.model.METHODS`.
METHODS = {"segmented": METHOD_SEGMENTED, "full": METHOD_FULL, "bayesian": METHOD_BAYESIAN}
assert set(METHODS) == set(_METHOD_NAMES), "every method of model.METHODS needs a kernel here"

#: Default of ``b_threshold`` (s/mm²), from :class:`fastivim.options.FitOptions`.
B_THRESHOLD = FitOptions().b_threshold

#: Bayesian fit: voxels in the EM subsample that learns the prior (drawn with the ``seed``).
EM_VOXELS = 4000
#: Bayesian fit: EM iterations from a uniform start, in stages of these lengths (100 in all:
#: on the tissue phantom 300 gave the same RMSE and coverage to within 0.01);
#: after each stage the grid points whose weight fell below EM_PRUNE of the largest are
#: dropped. Most of the grid has no support in the data and falls below that within a few
#: iterations; dropping it early is what makes the EM cheap (each iteration reads the whole
#: subsample x grid likelihood table twice).
EM_STAGES = (3, 7, 15, 25, 50)
EM_PRUNE = 1e-8
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

#: Iteration limit of each Levenberg–Marquardt run (accepted plus rejected steps).
MAX_ITERATIONS = 200

#: Large inputs are fitted in blocks, one kernel call each: Python handles Ctrl-C only between
#: calls into compiled code, and the progress bar moves once per block. Each block is sized
#: from the previous one's speed to take about :data:`BLOCK_SECONDS`, so Ctrl-C is honoured
#: within about that long on any method and thread count, while fast fits get large blocks
#: (each call costs a little: at a fixed 2**17 voxels about 1% of throughput, at 2**15 about 7%).
BLOCK_SECONDS = 0.25

#: Voxels of the first block, and the smallest and largest block.
PROGRESS_CHUNK = 1 << 15
MAX_BLOCK = 1 << 21

#: Below this many voxels the kernel runs on the calling thread alone (see _fit_on_one_thread).
SERIAL_BELOW = 2048

#: The compiled least-squares kernels: the block kernel (the default, vectorised) and the
#: scalar one-voxel-at-a-time kernel it reproduces (the reference of the equivalence tests and
#: the benchmark, reached with the private ``fit_voxels(..., _kernel="scalar")``).
KERNELS = ("block", "scalar")

#: Columns of the kernel's per-voxel output rows.
OUTPUT_COLUMNS = ("S0", "f", "D_star", "D", "r_squared", "rmse")

#: Maps summarised by :meth:`IVIMResult.summary` (run record, report, batch table).
SUMMARY_MAPS = ("D", "D_star", "f", "S0", "r_squared")


@dataclass
class IVIMResult:
    """Parameter maps of an IVIM fit, all of the signal's spatial shape.

    Attributes
    ----------
    D, D_star : float32 arrays
        Tissue diffusion and pseudo-diffusion coefficients, mm²/s.
    f : float32 array
        Perfusion fraction (dimensionless).
    S0 : float32 array
        Fitted signal at b = 0, in the input's units.
    r_squared, rmse : float32 arrays
        Coefficient of determination and root-mean-square residual (input units) over every
        sample of the voxel.
    quality_mask : bool array
        True where the fit converged, is finite, has D_star > D and no parameter pinned at a
        bound (``status == 0``).
    status : uint8 array
        Per-voxel code; meanings in :data:`fastivim.STATUS_MEANINGS`.
    method : str
        ``"segmented"`` or ``"full"``.
    bounds : dict
        ``{name: (lower, upper)}`` actually used.
    b_values : float64 array (n_b,)
        b-values in s/mm², in the signal's column order.
    b_threshold : float
        High-b threshold of the segmented step, s/mm².
    D_sd, D_star_sd, f_sd, S0_sd : float32 arrays or None
        Uncertainty (one standard deviation, in the map's own units) of each parameter map;
        None when not computed. The ``bayesian`` method always gives its posterior SD; the
        least-squares methods give them with ``uncertainty=True``.
    prior : str or None
        ``bayesian`` only: ``"empirical"`` when the prior was learned from the data (EM over a
        subsample), ``"weak"`` when there were too few usable voxels to learn one and a
        uniform prior over the grid was used instead; None for the other methods.
    noise_sigma : float or None
        ``bayesian`` only: the noise standard deviation estimated for the volume (input units).
    model : str
        ``"ivim"`` (the bi-exponential model), or ``"simplified"``: then ``D_star`` and
        ``D_star_sd`` are None (the model has no D_star) and R²/RMSE cover the samples the
        model describes (b = 0 and b >= b_threshold).
    """

    D: np.ndarray
    D_star: np.ndarray
    f: np.ndarray
    S0: np.ndarray
    r_squared: np.ndarray
    rmse: np.ndarray
    quality_mask: np.ndarray
    status: np.ndarray
    method: str
    bounds: dict
    b_values: np.ndarray
    b_threshold: float = B_THRESHOLD
    D_sd: np.ndarray | None = None
    D_star_sd: np.ndarray | None = None
    f_sd: np.ndarray | None = None
    S0_sd: np.ndarray | None = None
    prior: str | None = None
    noise_sigma: float | None = None
    model: str = "ivim"

    @property
    def shape(self) -> tuple:
        """Spatial shape of every map."""
        return self.D.shape

    def maps(self) -> dict:
        """The float maps by name: ``D``, ``D_star``, ``f``, ``S0``, ``r_squared``, ``rmse``
        (``D_star`` left out for the simplified model, which has none)."""
        names = ("D", "D_star", "f", "S0", "r_squared", "rmse")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def status_counts(self) -> dict:
        """Number of voxels per status code (only codes that occur)."""
        codes, counts = np.unique(self.status, return_counts=True)
        return {int(c): int(n) for c, n in zip(codes, counts, strict=True)}

    def summary(self, names=SUMMARY_MAPS) -> dict:
        """Median and quartiles of some maps inside the quality mask, and voxel counts.

        Parameters
        ----------
        names : sequence of str
            Result attributes; those that are None (absent for this model) are left out.

        Returns
        -------
        dict
            ``stats``: ``{name: {"median", "q25", "q75", "n"}}`` over the finite values in the
            quality mask, in the map's units (None when no voxel passed); ``voxels``:
            ``total``, ``fitted`` (inside the mask), ``quality`` and ``status_counts``
            (``{"code": count}``, string keys as in JSON).
        """
        q = np.asarray(self.quality_mask)
        stats = {}
        for name in names:
            m = getattr(self, name, None)
            if m is None:
                continue
            v = np.asarray(m, dtype=np.float64)[q]
            v = v[np.isfinite(v)]
            if v.size:
                q25, med, q75 = (float(x) for x in np.percentile(v, [25, 50, 75]))
            else:
                q25 = med = q75 = None
            stats[name] = {"median": med, "q25": q25, "q75": q75, "n": int(v.size)}
        counts = self.status_counts()
        total = int(np.asarray(self.status).size)
        return {"stats": stats,
                "voxels": {"total": total, "fitted": total - counts.get(st.OUTSIDE_MASK, 0),
                           "quality": int(q.sum()),
                           "status_counts": {str(k): v for k, v in counts.items()}}}


#: Plausible largest b-value of a diffusion acquisition, s/mm²: below it the values are most
#: likely in ms/µm² (0.8 for 800 s/mm²), above it in s/m² (8e8).
B_MAX_PLAUSIBLE = (100.0, 10000.0)

#: IVIM separates perfusion (sampled below this b-value, s/mm²) from diffusion (above it).
PERFUSION_B_LIMIT = 200.0

#: b-values closer than this (absolute s/mm², or relative) count as one shell when judging the
#: sampling: a DTI shell jittered around 1000 is one b-value, not six.
SHELL_ABS = 5.0
SHELL_REL = 0.02


def b_shells(b) -> np.ndarray:
    """The shells of a b-value list: sorted distinct values, near-equal ones merged.

    Values within ``SHELL_ABS`` s/mm² or ``SHELL_REL`` of the previous shell's first value join
    it. Returns each shell's smallest value, float64 (n_shells,).
    """
    shells = []
    for v in np.unique(np.asarray(b, dtype=np.float64)):
        if shells and v - shells[-1] <= max(SHELL_ABS, SHELL_REL * shells[-1]):
            continue
        shells.append(v)
    return np.asarray(shells)


def _check_b_units(b: np.ndarray) -> None:
    """``ValueError`` unless the largest b-value is plausible in s/mm²."""
    lo, hi = B_MAX_PLAUSIBLE
    bmax = float(b.max())
    if bmax < lo:
        hint = ("if they are in ms/µm² (a largest value of 0.8 is typical), multiply them by "
                "1000" if bmax <= 10 else "an IVIM acquisition needs b-values past "
                f"{PERFUSION_B_LIMIT:g} s/mm² for D")
        raise ValueError(f"the largest b-value is {bmax:g}, too small for b-values in s/mm² "
                         f"(diffusion b-values lie between about 1 and 10,000 s/mm²); {hint}")
    if bmax > hi:
        hint = ("they look like s/m²: divide them by 1e6" if bmax > 1e5 else
                "no tissue diffusion acquisition goes that high")
        raise ValueError(f"the largest b-value is {bmax:g}, too large for b-values in s/mm² "
                         f"(diffusion b-values lie between about 1 and 10,000 s/mm²); {hint}")


def _check_ivim_sampling(b: np.ndarray) -> None:
    """``ValueError`` unless the b-values can separate perfusion from diffusion.

    The rule: at least 2 shells (see :func:`b_shells`) below ``PERFUSION_B_LIMIT`` (f and
    D_star live there; one may be b = 0) and at least 2 at or above it (D).
    """
    shells = b_shells(b)
    low = shells[shells < PERFUSION_B_LIMIT]
    high = shells[shells >= PERFUSION_B_LIMIT]
    note = (f"b-values within {SHELL_ABS:g} s/mm² or {SHELL_REL:.0%} of each other count as "
            f"one")
    if low.size < 2:
        raise ValueError(
            f"not an IVIM acquisition: {low.size} distinct b-value(s) below "
            f"{PERFUSION_B_LIMIT:g} s/mm² ({', '.join(f'{v:g}' for v in low) or 'none'}); "
            f"f and D_star need at least 2 there (e.g. 0 and 50) to be told from D ({note})"
        )
    if high.size < 2:
        raise ValueError(
            f"not an IVIM acquisition: {high.size} distinct b-value(s) at or above "
            f"{PERFUSION_B_LIMIT:g} s/mm² ({', '.join(f'{v:g}' for v in high) or 'none'}); "
            f"D needs at least 2 there ({note})"
        )


def validate_b_values(b_values, n_b: int | None = None, model: str = "ivim"
                      ) -> np.ndarray:
    """Check b-values and return them as float64 (n_b,).

    ``model="simplified"`` asks for 3 distinct values instead of 4 and replaces the IVIM
    sampling rule with its own (b = 0 and 2 values at or above b_threshold, checked in the
    fit, which knows the threshold).

    Raises
    ------
    ValueError
        Not 1-D numeric, a NaN/inf or negative value, a count different from ``n_b``, fewer
        than 4 distinct values, a largest value implausible in s/mm² (``B_MAX_PLAUSIBLE``: the
        message names the likely unit), or a sampling that cannot separate perfusion from
        diffusion (:func:`_check_ivim_sampling`).
    """
    try:
        b = np.asarray(b_values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("b-values must be numbers") from None
    if b.ndim != 1:
        raise ValueError(f"b-values must be one-dimensional, got shape {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("b-values contain NaN or inf")
    if np.any(b < 0):
        raise ValueError(f"b-values must be >= 0, got {b.min():g}")
    if n_b is not None and b.size != n_b:
        raise ValueError(f"{b.size} b-values given but the signal has {n_b} samples per voxel")
    n_distinct = np.unique(b).size
    need = 3 if model == "simplified" else 4
    if n_distinct < need:
        what = "the simplified IVIM model" if model == "simplified" else "IVIM"
        raise ValueError(
            f"{what} needs at least {need} distinct b-values, got {n_distinct} "
            f"({np.unique(b).tolist()})"
        )
    _check_b_units(b)
    if model != "simplified":
        _check_ivim_sampling(b)
    return b


def check_fit_sampling(b: np.ndarray, options) -> float:
    """Checks of the b-values against the fit options; returns ``b_threshold``.

    Beyond :func:`_check_threshold`: uncertainty maps of the least-squares methods need at
    least one residual degree of freedom (``sigma² = SSR / (n - k)``), or every SD would be
    NaN. ``options`` is a :class:`fastivim.options.FitOptions`.

    Raises
    ------
    ValueError
        The reason, in one line.
    """
    b_threshold = _check_threshold(b, options.b_threshold, options.method, options.model)
    if options.uncertainty and options.method != "bayesian":
        if options.model == "simplified":
            n_used, k = int(np.sum((b == 0) | (b >= b_threshold))), 3
        else:
            n_used, k = int(b.size), 4
        if n_used <= k:
            raise ValueError(
                f"uncertainty maps need at least one residual degree of freedom: the "
                f"{options.model} model's {options.method} fit uses {n_used} samples for {k} "
                f"parameters; acquire another b-value (or a repeat) or drop uncertainty"
            )
    return b_threshold


def _check_threshold(b: np.ndarray, b_threshold: float, method: str,
                     model: str = "ivim") -> float:
    if model == "simplified":
        n_high = np.unique(b[b >= b_threshold]).size
        if not np.any(b == 0) or n_high < 2:
            raise ValueError(
                f"the simplified model needs b = 0 and at least 2 distinct b-values >= "
                f"b_threshold ({b_threshold:g} s/mm²), got {'a' if np.any(b == 0) else 'no'} "
                f"b = 0 and {n_high}"
            )
        return b_threshold
    if method == "segmented":
        n_high = np.unique(b[b >= b_threshold]).size
        if n_high < 2:
            raise ValueError(
                f"the segmented fit needs at least 2 distinct b-values >= b_threshold "
                f"({b_threshold:g} s/mm²), got {n_high}"
            )
    return b_threshold


def _as_kernel_matrix(Y: np.ndarray) -> np.ndarray:
    """A native-endian, C-contiguous float32/float64 view or copy of ``Y`` (n_vox, n_b).

    float32 and float64 pass through without a copy when already contiguous; small integers
    become float32 (exact), anything wider becomes float64.
    """
    if Y.dtype.kind not in "fiub":
        raise ValueError(f"signal must be real numbers, got dtype {Y.dtype}")
    if Y.dtype == np.float64 or Y.dtype == np.float32:
        dtype = Y.dtype.newbyteorder("=")
    elif Y.dtype.kind in "iub" and Y.dtype.itemsize <= 2 or Y.dtype == np.float16:
        dtype = np.dtype(np.float32)
    else:
        dtype = np.dtype(np.float64)
    return np.ascontiguousarray(Y, dtype=dtype)


def _kernel_function(kernel):
    """The compiled kernel named ``kernel``; the first call checks numba's cache is current."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid kernels are {', '.join(KERNELS)}")
    ensure_fresh_cache()
    return fit_volume_block if kernel == "block" else fit_volume


def _run_kernel(Y, method_code, b, bounds, b_threshold, progress, kernel="block"):
    """Fit a (n_vox, n_b) matrix; return ``out`` (n_vox, 6) float32 and ``status`` uint8."""
    n = Y.shape[0]
    out = np.empty((n, len(OUTPUT_COLUMNS)), dtype=np.float32)
    status = np.empty(n, dtype=np.uint8)
    run = _kernel_function(kernel)
    if n == 0:
        return out, status
    tables = make_tables(b, bounds_array(bounds))
    settings = make_settings(method_code, b_threshold, MAX_ITERATIONS)
    if n < SERIAL_BELOW and not progress:
        _fit_on_one_thread(run, Y, tables, settings, out, status)
        return out, status
    bar = None
    if progress:
        from tqdm.auto import tqdm  # lazy: pipelines that never ask for a bar never import it

        bar = tqdm(total=n, unit="vox", unit_scale=True, desc="fitting", leave=False)
    try:
        a, block = 0, PROGRESS_CHUNK
        while a < n:  # blocks: an interrupt waits for one block at most
            z = min(a + block, n)
            t0 = time.perf_counter()
            run(Y[a:z], tables, settings, chunk_count(z - a), out[a:z], status[a:z])
            rate = (z - a) / max(time.perf_counter() - t0, 1e-6)
            block = int(min(max(rate * BLOCK_SECONDS, PROGRESS_CHUNK), MAX_BLOCK))
            if bar is not None:
                bar.update(z - a)
            a = z
    finally:
        if bar is not None:
            bar.close()
    return out, status


def _fit_on_one_thread(run, Y, tables, settings, out, status):
    """Run the kernel on the calling thread only: waking the pool costs more than a few hundred
    voxels take (measured: 100 voxels ran at 18k voxels/s on 2 threads, 300k on 1)."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        run(Y, tables, settings, 1, out, status)
    finally:
        numba.set_num_threads(threads)


def load_kernel(dtype=np.float32) -> float:
    """Compile, or load from numba's on-disk cache, the kernel for signals of ``dtype``.

    The first fit in a process pays this once per kernel dtype (float32 or float64; both
    methods share one kernel): about 15–25 s to compile in a fresh checkout, a fraction of a
    second to load from the cache afterwards. Calling it first keeps that cost out of fit
    timings. Returns the seconds it took.
    """
    import time

    t0 = time.perf_counter()
    probe = _as_kernel_matrix(np.ones((1, 4), dtype=dtype))
    fit_voxels(probe, [0.0, 100.0, 200.0, 800.0], method="segmented")
    return time.perf_counter() - t0


def fit_voxels(Y, b_values, method="full", bounds=None, b_threshold=B_THRESHOLD,
               progress=False,
               seed=0, uncertainty=False, model="ivim", *, _kernel="block"):
    """Fit the IVIM model to every row of a voxel × b matrix (the kernel entry for pipelines).

    Parameters
    ----------
    Y : array_like, shape (n_vox, n_b)
        Signal, one voxel per row. A C-contiguous float32/float64 array is used without a copy.
    b_values : array_like, shape (n_b,)
        b-values in s/mm², any order, repeats allowed; at least 4 distinct.
    method : {"full", "segmented", "bayesian"}
        See :func:`fit_ivim`.
    bounds : dict, optional
        ``{"S0"|"f"|"D_star"|"D": (lower, upper)}`` over :data:`fastivim.DEFAULT_BOUNDS`.
    b_threshold : float
        s/mm²; samples at or above it give D in the segmented method (and its start).
    progress : bool
        Show a tqdm bar on stderr.
    seed : int
        ``bayesian`` only: seed of the EM subsample (same seed, same maps, bit for bit).
    uncertainty : bool
        Also compute ``D_sd``, ``D_star_sd``, ``f_sd``, ``S0_sd`` (see :func:`fit_ivim`).
    model : {"ivim", "simplified"}
        See :func:`fit_ivim`.
    _kernel : {"block", "scalar"}
        Private: which compiled least-squares kernel runs (:data:`KERNELS`). Both give the same
        answers; the scalar one is the reference for the tests and the benchmark.

    Returns
    -------
    IVIMResult
        Every map of shape (n_vox,).
    """
    Y = np.asarray(Y)
    if Y.ndim != 2:
        raise ValueError(f"Y must be 2-D (n_vox, n_b), got shape {Y.shape}")
    return _fit(Y, None, b_values, method, bounds, b_threshold, progress, (Y.shape[0],), seed,
                uncertainty, model, _kernel)


def fit_ivim(signal, b_values, mask=None, method="segmented", bounds=None,
             b_threshold=B_THRESHOLD, progress=False, seed=0, uncertainty=False, model="ivim"):
    """Fit the IVIM model voxel by voxel.

    ``S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D))``

    Parameters
    ----------
    signal : array_like, shape (..., n_b)
        Diffusion-weighted signal, b-values along the last axis; any real dtype.
    b_values : array_like, shape (n_b,)
        b-values in s/mm², any order, repeats allowed; at least 4 distinct.
    mask : array_like of bool, shape signal.shape[:-1], optional
        Voxels to fit; None fits every voxel.
    method : {"segmented", "full", "bayesian"}
        Two-step fit with D from the high-b samples, all four parameters together (both least
        squares), or grid empirical Bayes: a prior over (D, D_star, f) learned from the
        volume by EM on a subsample, then each voxel's posterior mean as the map and its
        posterior SD as ``D_sd``, ``D_star_sd``, ``f_sd``, ``S0_sd`` (see
        :mod:`fastivim.kernels.bayes`). With fewer than ``MIN_EM_VOXELS`` usable voxels the
        Bayesian fit uses a weak prior (uniform over the grid) and says so in ``prior``.
    bounds : dict, optional
        ``{"S0"|"f"|"D_star"|"D": (lower, upper)}`` over the defaults; D_star > D always.
    b_threshold : float
        s/mm²: samples at or above it give D in the segmented method.
    progress : bool
        Show a tqdm progress bar on stderr.
    seed : int
        ``bayesian`` only: seed of the EM subsample (same seed, same maps, bit for bit, on any
        number of threads).
    uncertainty : bool
        Add one-SD uncertainty maps ``D_sd``, ``D_star_sd``, ``f_sd``, ``S0_sd`` (float32, each
        map's own units). ``full``: ``sigma² (JᵀJ)⁻¹`` at the minimum with ``sigma² = SSR /
        (n_b - 4)``; ``segmented``: from its two steps (see
        :mod:`fastivim.kernels.uncertainty`); ``bayesian``: the posterior SD, computed
        whatever this flag says. NaN where the map is NaN or the SD is undetermined.
    model : {"ivim", "simplified"}
        ``"simplified"``: ``S(0) = S0``, ``S(b) = S0 (1 - f) exp(-b D)`` for ``b >=
        b_threshold`` (osipy's simplified model, for 3-5 b-value protocols where D_star cannot
        be fitted; samples with 0 < b < b_threshold are not used). Needs b = 0 and 2 distinct
        b-values >= b_threshold; ``segmented`` and ``full`` give the same least-squares fit
        (``bayesian`` is refused). The result's ``D_star`` (and ``D_star_sd``) is None.

    Returns
    -------
    IVIMResult
        Maps of shape ``signal.shape[:-1]``; NaN (and status 6) outside the mask.
    """
    signal = np.asarray(signal)
    if signal.ndim < 1:
        raise ValueError("signal must have at least one axis (the b-values)")
    spatial = signal.shape[:-1]
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != spatial:
            raise ValueError(f"mask shape {mask.shape} does not match the signal's {spatial}")
        # any non-zero voxel is in; NaN is out (as for mask files read by fastivim.io)
        mask = np.nan_to_num(mask, nan=0.0) != 0 if mask.dtype.kind == "f" else mask.astype(bool)
    return _fit(signal, mask, b_values, method, bounds, b_threshold, progress, spatial, seed,
                uncertainty, model)


def _fit(signal, mask, b_values, method, bounds, b_threshold, progress, spatial, seed=0,
         uncertainty=False, model="ivim", kernel="block"):
    opts = FitOptions(method=method, bounds=bounds, b_threshold=b_threshold, model=model,
                      uncertainty=uncertainty, seed=seed)
    code = METHODS[opts.method]
    model = opts.model
    b = validate_b_values(b_values, signal.shape[-1], model)
    b_threshold = check_fit_sampling(b, opts)
    bounds = dict(opts.bounds)
    seed = opts.seed
    uncertainty = opts.uncertainty
    n_b = signal.shape[-1]
    if mask is None:
        Y = _as_kernel_matrix(signal.reshape(-1, n_b))
    else:
        Y = _as_kernel_matrix(signal[mask])
    extra = {}
    ensure_fresh_cache()  # before any cached kernel (least squares, simplified, Bayesian) loads
    if model == "simplified":
        out, status, sd = _run_simplified(Y, b, bounds, b_threshold, uncertainty)
        extra = {"model": model}
    elif code == METHOD_BAYESIAN:
        out, status, sd, extra = _run_bayesian(Y, b, bounds, b_threshold, seed, progress)
    else:
        out, status = _run_kernel(Y, code, b, bounds, b_threshold, progress, kernel)
        sd = _ls_uncertainty(Y, code, b, b_threshold, out) if uncertainty else None
    maps = _unflatten(_columns_inside_bounds(out, bounds), OUTPUT_COLUMNS, mask, spatial)
    if sd is not None:
        maps.update(_unflatten(_columns_inside_bounds(sd, None), bayes.SD_COLUMNS, mask,
                               spatial))
    if mask is None:
        status_map = status.reshape(spatial)
    else:
        status_map = np.full(spatial, st.OUTSIDE_MASK, dtype=np.uint8)
        status_map[mask] = status
    del out, sd
    if model == "simplified":
        maps["D_star"] = None  # the model has no D_star: no map rather than a NaN one
        maps.pop("D_star_sd", None)
    return IVIMResult(
        quality_mask=status_map == st.OK,
        status=status_map,
        method=method,
        bounds=bounds,
        b_values=b,
        b_threshold=b_threshold,
        **maps,
        **extra,
    )


def _run_simplified(Y, b, bounds, b_threshold, want_sd):
    """Fit the simplified model to a (n_vox, n_b) matrix: ``out`` (n_vox, 6) float32 with a
    NaN D_star column, ``status`` uint8, and ``sd`` (n_vox, 4) float32 or None."""
    n = Y.shape[0]
    out = np.empty((n, len(OUTPUT_COLUMNS)), dtype=np.float32)
    sd = np.empty((n, 4), dtype=np.float32)
    status = np.empty(n, dtype=np.uint8)
    if n:
        bu, groups = np.unique(b, return_inverse=True)
        w = np.bincount(groups).astype(np.float64)
        simplified.fit_simplified_volume(Y, groups.astype(np.int64), bu * 1e-3, w, bu == 0,
                                         bu >= b_threshold, bounds_array(bounds),
                                         bool(want_sd), chunk_count(n), out, sd, status)
    return out, status, (sd if want_sd else None)


def _ls_uncertainty(Y, code, b, b_threshold, out):
    """SDs (n_vox, 4) float32 of the least-squares maps in ``out`` (see
    :mod:`fastivim.kernels.uncertainty`), in :data:`PARAM_NAMES` order."""
    n = Y.shape[0]
    sd = np.empty((n, 4), dtype=np.float32)
    if n == 0:
        return sd
    bu, groups = np.unique(b, return_inverse=True)
    w = np.bincount(groups).astype(np.float64)
    kind = uncertainty.KIND_FULL if code == METHOD_FULL else uncertainty.KIND_SEGMENTED
    uncertainty.ls_uncertainty(Y, kind, groups.astype(np.int64), bu * 1e-3, w, b_threshold * 1e-3,
                               chunk_count(n), out, sd)
    return sd


def _columns_inside_bounds(out, bounds):
    """``out`` (n_vox, k) float32 as ``(k, n_vox)`` contiguous columns, the parameter columns
    rounded inward onto ``bounds`` (None: no rounding), in one parallel compiled pass
    (:func:`fastivim.kernels.output.split_columns`).

    The kernels keep every estimate inside its float64 bounds, but storing a value fitted on a
    bound as float32 rounds to the nearest float32, which can lie outside (0.3 becomes
    0.30000001). Such values move to the nearest float32 inside; nothing else changes (a move
    of at most one float32 ulp), and NaN stays NaN.
    """
    n, k = out.shape
    cols = np.empty((k, n), dtype=np.float32)
    if bounds is None:
        lo32 = hi32 = np.empty(0, dtype=np.float32)
    else:
        lo32, hi32 = float32_bounds(bounds)
    split_columns(out, lo32, hi32, chunk_count(n), cols)
    return cols


def _unflatten(cols, names, mask, spatial):
    """Rows of ``cols`` (k, n_vox) as maps of ``spatial`` shape by name (NaN off the mask)."""
    maps = {}
    for k, name in enumerate(names):
        if mask is None:
            maps[name] = cols[k].reshape(spatial)
        else:
            full = np.full(spatial, np.nan, dtype=np.float32)
            full[mask] = cols[k]
            maps[name] = full
    return maps


# ------------------------------------------------------------------------------- bayesian
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
    out, _ = _run_kernel(np.ascontiguousarray(Y[rows]), METHOD_FULL, b, bounds, b_threshold,
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
    bayes.em_likelihoods(Y, rows, t["groups"], t["w"], sigma2, t["M"], t["nn"], 1.0 / t["nn"],
                         t["lnorm"], *s0_bounds, chunk_count(n), buf.reshape(n, ng), usable)
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


def _run_bayesian(Y, b, bounds, b_threshold, seed, progress):
    """Grid empirical-Bayes fit of a (n_vox, n_b) matrix (see :mod:`fastivim.kernels.bayes`).

    Returns ``out`` (n_vox, 6) and ``sd`` (n_vox, 4) float32, ``status`` uint8 and the extra
    result fields (``prior``, ``noise_sigma``).
    """
    n = Y.shape[0]
    out = np.full((n, len(OUTPUT_COLUMNS)), np.nan, dtype=np.float32)
    sd = np.full((n, len(bayes.SD_COLUMNS)), np.nan, dtype=np.float32)
    status = np.full(n, st.NUMERICAL_FAILURE, dtype=np.uint8)
    if n == 0:
        return out, status, sd, {"prior": None, "noise_sigma": None}
    barr = bounds_array(bounds)
    t = bayes.make_bayes_tables(b, barr)
    rows = _subsample(n, seed)
    sigma2 = _noise_variance(Y, rows, b, bounds, b_threshold)
    if not math.isfinite(sigma2):
        # no voxel of the subsample could be fitted, so there is no noise estimate: bad input
        # is reported as such (the kernels' test: a non-finite sample, or no group mean > 0),
        # every other voxel as a numerical failure
        status[:] = np.where(_usable_rows(Y, t["groups"], t["w"]), st.NUMERICAL_FAILURE,
                             st.BAD_INPUT)
        return out, status, sd, {"prior": None, "noise_sigma": None}
    s0_bounds = (float(barr[0, 0]), float(barr[0, 1]))
    weights = _learn_prior(Y, rows, t, sigma2, s0_bounds)
    prior = "empirical" if weights is not None else "weak"
    if weights is None:
        weights = np.full(t["nn"].size, 1.0 / t["nn"].size)
    keep = weights >= PRIOR_PRUNE * weights.max()
    tables = (np.ascontiguousarray(t["M"][:, keep]), t["nn"][keep], 1.0 / t["nn"][keep],
              np.log(weights[keep]) + t["lnorm"][keep],
              np.ascontiguousarray(t["par"][:, keep]), np.ascontiguousarray(t["cvar"][:, keep]),
              np.ascontiguousarray(t["edge"][:, keep]))
    args = (t["groups"], t["w"], t["bu"], sigma2, *tables, *s0_bounds)
    step = PROGRESS_CHUNK if progress else n
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="vox", unit_scale=True, desc="fitting", leave=False)
    try:
        for a in range(0, n, step):
            z = min(a + step, n)
            bayes.posterior_volume(Y[a:z], *args, chunk_count(z - a), out[a:z], sd[a:z],
                                   status[a:z])
            if bar is not None:
                bar.update(z - a)
    finally:
        if bar is not None:
            bar.close()
    return out, status, sd, {"prior": prior, "noise_sigma": math.sqrt(sigma2)}


__all__ = ["IVIMResult", "METHODS", "MODELS", "fit_ivim", "fit_voxels", "validate_b_values",
           "PARAM_NAMES"]
