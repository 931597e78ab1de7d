"""The Python face of the kernels: validate, coerce, mask, flatten, fit, unflatten.

Data flow: signal (..., n_b) → validate → mask → C-contiguous (n_vox, n_b) → compiled kernel →
(n_vox, 6) + status → maps of shape ``signal.shape[:-1]`` (float32; NaN where not fitted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .adc import ADC_COLUMNS, adc_columns
from .compiling import watch_compiles
from .kernels import bayes, ensure_fresh_cache
from .kernels import status as st
from .kernels.driver import chunk_count
from .kernels.output import split_columns
from .methods import REGISTRY, FitRequest
from .methods import get as get_method
from .methods import simplified as simplified_model
from .methods.least_squares import OUTPUT_COLUMNS
from .model import MODELS, PARAM_NAMES, float32_bounds
from .options import FitOptions

#: Method names accepted by :func:`fit_ivim` and :func:`fit_voxels`, each with its module in
#: :mod:`fastivim.methods` (descriptions in :data:`fastivim.model.METHODS`).
METHODS = tuple(REGISTRY)

#: Default of ``b_threshold`` (s/mm²), from :class:`fastivim.options.FitOptions`.
B_THRESHOLD = FitOptions().b_threshold

#: Maps summarised by :meth:`IVIMResult.summary` (run record, report, batch table).
SUMMARY_MAPS = ("D", "D_star", "f", "S0", "r_squared", "ADC", "ADC_high")


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
        The method that fitted the maps, a key of :data:`fastivim.METHODS`: ``"segmented"``
        (two steps: D from the samples at or above ``b_threshold``, then S0, f and D_star with
        D fixed), ``"full"`` (all four parameters together, from several starts),
        ``"bayesian"`` (grid empirical Bayes: posterior means, with SD maps) or ``"spatial"``
        (the Bayesian posterior pooled over neighbours with edge-preserving weights, with SD
        maps; volumes only).
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
    ADC, ADC_high : float32 arrays or None
        Apparent diffusion coefficients, mm²/s, from mono-exponential fits (log-linear least
        squares, whatever the method): ``ADC`` over **all** b-values (the clinical ADC;
        perfusion included, so above D in perfused tissue), ``ADC_high`` over the b-values
        >= ``b_threshold`` (perfusion suppressed). NaN outside the mask and where a sample
        used is not positive (see :mod:`fastivim.adc`). None when not computed
        (``fit_voxels`` without ``adc=True``, ``fit_ivim(..., adc=False)``) and in results read
        from outputs written before these maps existed.
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
    ADC: np.ndarray | None = None
    ADC_high: np.ndarray | None = None

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
    if options.uncertainty and options.method not in ("bayesian", "spatial"):
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
    become float32 (exact), anything wider becomes float64. The kernels take float64 only (one
    compile for every dtype): the methods convert a block of rows at a time
    (:func:`fastivim.methods._blocks.float64_rows`), so float32 input is never doubled.
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


def load_kernel(method="segmented", model="ivim", uncertainty=False) -> float:
    """Compile, or load from numba's on-disk cache, the kernels a fit with these options uses.

    Each method (and the uncertainty and simplified-model options) has its own kernels, and one
    compile serves every input dtype. A fresh cache folder compiles them (reported on the
    ``fastivim.compile`` logger, see :mod:`fastivim.compiling`); later processes load them in a
    fraction of a second. Calling it first keeps that cost out of fit timings, and for
    ``"bayesian"`` and ``"spatial"`` it shortens the first wait on a machine with two CPUs or
    more: the ``full`` kernel (the noise estimate) compiles in a second process beside the
    method's own kernels (the wait is the longer of the two), where a first fit compiles them
    one after the other. Returns the seconds it took.
    """
    from .compiling import compile_kernels, targets_for

    t0 = time.perf_counter()
    compile_kernels(targets_for(method, model, uncertainty))
    return time.perf_counter() - t0


def fit_voxels(Y, b_values, method="segmented", bounds=None, b_threshold=B_THRESHOLD,
               progress=False,
               seed=0, uncertainty=False, model="ivim", *, adc=False, _kernel="block"):
    """Fit the IVIM model to every row of a voxel × b matrix (the kernel entry for pipelines).

    Parameters
    ----------
    Y : array_like, shape (n_vox, n_b)
        Signal, one voxel per row. A C-contiguous float32/float64 array is used without a copy.
    b_values : array_like, shape (n_b,)
        b-values in s/mm², any order, repeats allowed; at least 4 distinct.
    method : {"segmented", "full", "bayesian"}, default "segmented"
        The same default as :func:`fit_ivim` and ``fastivim run``; see :func:`fit_ivim`.
        ``"spatial"`` needs a volume and is refused here (a ValueError).
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
    adc : bool
        Also the ``ADC`` and ``ADC_high`` maps (see :func:`fit_ivim`). Off by default here, the
        kernel entry for pipelines: they cost about as much as a third of the segmented fit
        (single-threaded NumPy).
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
                uncertainty, model, _kernel, volume=False, adc=adc)


def fit_ivim(signal, b_values, mask=None, method="segmented", bounds=None,
             b_threshold=B_THRESHOLD, progress=False, seed=0, uncertainty=False, model="ivim",
             voxel_sizes=None, adc=True):
    """Fit the IVIM model voxel by voxel.

    ``S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D))``

    Parameters
    ----------
    signal : array_like, shape (..., n_b)
        Diffusion-weighted signal, b-values along the last axis; any real dtype.
    b_values : array_like, shape (n_b,)
        b-values in s/mm², any order, repeats allowed; at least 4 distinct.
    mask : array_like of bool, shape signal.shape[:-1], "auto", or None
        Voxels to fit. ``"auto"``: ``fastivim run``'s automatic mask (voxels whose lowest-b
        signal exceeds 0.1 × the 99th percentile of the lowest-b image, see
        :func:`fastivim.masking.auto_mask`), which leaves out the background. None (the
        default) fits every voxel, background included: maps hold noise fits there and the
        fit takes longer. Non-zero voxels of an array are in, NaN is out.
    method : {"segmented", "full", "bayesian", "spatial"}, default "segmented"
        The same default as ``fastivim run`` and :func:`fit_voxels`. Two-step fit with D from
        the high-b samples, all four parameters together (both least squares), or grid
        empirical Bayes: a prior over (D, D_star, f) learned from the
        volume by EM on a subsample, then each voxel's posterior mean as the map and its
        posterior SD as ``D_sd``, ``D_star_sd``, ``f_sd``, ``S0_sd`` (see
        :mod:`fastivim.kernels.bayes`). With fewer than ``MIN_EM_VOXELS`` usable voxels the
        Bayesian fit uses a weak prior (uniform over the grid) and says so in ``prior``.
        ``spatial``: the Bayesian posterior of each voxel's local tissue, pooling the signals
        of the neighbours within a few mm whose own posteriors are alike (lesions and organ
        edges are kept); needs a 2-D or 3-D volume and takes ``voxel_sizes`` (see
        :mod:`fastivim.kernels.spatial`); always gives the SD maps.
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
        (``bayesian`` and ``spatial`` are refused). The result's ``D_star`` (and
        ``D_star_sd``) is None.
    voxel_sizes : sequence of float, optional
        ``spatial`` only: voxel size along each spatial axis, mm (a NIfTI header's zooms);
        None: 1 mm isotropic. The neighbourhood is a radius in mm, so anisotropic voxels
        (1.5 x 1.5 x 4 mm) reach fewer neighbours through-plane than in-plane.

    adc : bool
        Also the mono-exponential ``ADC`` (over all b-values) and ``ADC_high`` (over b >=
        b_threshold) maps (see :mod:`fastivim.adc`); on by default.

    Returns
    -------
    IVIMResult
        Maps of shape ``signal.shape[:-1]``; NaN (and status 6) outside the mask.
    """
    signal = np.asarray(signal)
    if signal.ndim < 1:
        raise ValueError("signal must have at least one axis (the b-values)")
    spatial = signal.shape[:-1]
    if isinstance(mask, str):
        if mask != "auto":
            raise ValueError(f"mask must be an array, None or 'auto', got {mask!r}")
        from .masking import auto_mask

        mask, _ = auto_mask(signal, validate_b_values(b_values, signal.shape[-1], model))
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != spatial:
            raise ValueError(f"mask shape {mask.shape} does not match the signal's {spatial}")
        # any non-zero voxel is in; NaN is out (as for mask files read by fastivim.io)
        mask = np.nan_to_num(mask, nan=0.0) != 0 if mask.dtype.kind == "f" else mask.astype(bool)
    return _fit(signal, mask, b_values, method, bounds, b_threshold, progress, spatial, seed,
                uncertainty, model, voxel_sizes=voxel_sizes, adc=adc)


def _fit(signal, mask, b_values, method, bounds, b_threshold, progress, spatial, seed=0,
         uncertainty=False, model="ivim", kernel="block", volume=True, voxel_sizes=None,
         adc=True):
    """Validate, flatten, run the registered method, and build the result.

    ``volume`` is False for :func:`fit_voxels` (rows without geometry): then a method that
    needs a volume is refused.
    """
    opts = FitOptions(method=method, bounds=bounds, b_threshold=b_threshold, model=model,
                      uncertainty=uncertainty, seed=seed)
    estimator = get_method(opts.method)
    if estimator.needs == "volume" and not volume:
        raise ValueError(f"method {opts.method!r} needs a volume (it pools neighbouring "
                         f"voxels): call fit_ivim with the signal's spatial shape instead of "
                         f"fit_voxels")
    b = validate_b_values(b_values, signal.shape[-1], opts.model)
    request = FitRequest(b=b, bounds=dict(opts.bounds), b_threshold=check_fit_sampling(b, opts),
                         seed=opts.seed, uncertainty=opts.uncertainty, model=opts.model,
                         progress=progress, kernel=kernel, mask=mask,
                         spatial=spatial if volume else None,
                         voxel_sizes=None if voxel_sizes is None else tuple(voxel_sizes))
    n_b = signal.shape[-1]
    if mask is None:
        Y = _as_kernel_matrix(signal.reshape(-1, n_b))
    else:
        Y = _as_kernel_matrix(signal[mask])
    ensure_fresh_cache()  # before any cached kernel (least squares, simplified, Bayesian) loads
    watch_compiles()  # a kernel that compiles says so
    run = simplified_model.run if opts.model == "simplified" else estimator.run
    out, status, sd, extra = run(Y, request)
    maps = _unflatten(_columns_inside_bounds(out, request.bounds, status), OUTPUT_COLUMNS, mask,
                      spatial)
    if adc:
        maps.update(_unflatten(adc_columns(Y, b, request.b_threshold), ADC_COLUMNS, mask,
                               spatial))
    if sd is not None:
        sd[status == st.NUMERICAL_FAILURE] = np.nan  # rows the split found overflowed
        maps.update(_unflatten(_columns_inside_bounds(sd, None, status), bayes.SD_COLUMNS, mask,
                               spatial))
    if mask is None:
        status_map = status.reshape(spatial)
    else:
        status_map = np.full(spatial, st.OUTSIDE_MASK, dtype=np.uint8)
        status_map[mask] = status
    del out, sd
    if opts.model == "simplified":
        maps["D_star"] = None  # the model has no D_star: no map rather than a NaN one
        maps.pop("D_star_sd", None)
    return IVIMResult(
        quality_mask=status_map == st.OK,
        status=status_map,
        method=method,
        bounds=request.bounds,
        b_values=b,
        b_threshold=request.b_threshold,
        **maps,
        **extra,
    )


def _columns_inside_bounds(out, bounds, status):
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
    split_columns(out, lo32, hi32, chunk_count(n), cols, status)
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


__all__ = ["IVIMResult", "METHODS", "MODELS", "fit_ivim", "fit_voxels", "validate_b_values",
           "PARAM_NAMES"]
