"""The Python face of the kernels: validate, coerce, mask, flatten, fit, unflatten.

Data flow: signal (..., n_b) → validate → mask → C-contiguous (n_vox, n_b) → compiled kernel →
(n_vox, 6) + status → maps of shape ``signal.shape[:-1]`` (float32; NaN where not fitted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .kernels import status as st
from .kernels.driver import METHOD_FULL, METHOD_SEGMENTED, chunk_count, fit_volume, make_tables
from .model import METHODS as _METHOD_NAMES
from .model import PARAM_NAMES, bounds_array, float32_bounds
from .options import FitOptions

#: Method names accepted by :func:`fit_ivim` and :func:`fit_voxels`, with their kernel code.
#: The names and their descriptions are declared in :data:`fastivim.model.METHODS`.
METHODS = {"segmented": METHOD_SEGMENTED, "full": METHOD_FULL}
assert set(METHODS) == set(_METHOD_NAMES), "every method of model.METHODS needs a kernel here"

#: Default of ``b_threshold`` (s/mm²), from :class:`fastivim.options.FitOptions`.
B_THRESHOLD = FitOptions().b_threshold

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

    @property
    def shape(self) -> tuple:
        """Spatial shape of every map."""
        return self.D.shape

    def maps(self) -> dict:
        """The float maps by name: ``D``, ``D_star``, ``f``, ``S0``, ``r_squared``, ``rmse``."""
        return {name: getattr(self, name) for name in ("D", "D_star", "f", "S0", "r_squared",
                                                      "rmse")}

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


def validate_b_values(b_values, n_b: int | None = None) -> np.ndarray:
    """Check b-values and return them as float64 (n_b,).

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
    if n_distinct < 4:
        raise ValueError(
            f"IVIM needs at least 4 distinct b-values, got {n_distinct} ({np.unique(b).tolist()})"
        )
    _check_b_units(b)
    _check_ivim_sampling(b)
    return b


def _check_threshold(b: np.ndarray, b_threshold: float, method: str) -> float:
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


def _run_kernel(Y, method_code, b, bounds, b_threshold, progress):
    """Fit a (n_vox, n_b) matrix; return ``out`` (n_vox, 6) float32 and ``status`` uint8."""
    n = Y.shape[0]
    out = np.empty((n, len(OUTPUT_COLUMNS)), dtype=np.float32)
    status = np.empty(n, dtype=np.uint8)
    if n == 0:
        return out, status
    barr = bounds_array(bounds)
    t = make_tables(b, barr)
    args = (t["groups"], t["bu"], t["w"], barr, b_threshold * 1e-3, t["ES"], t["ED"],
            t["GSS"], t["PAIR"], t["dstar_grid"], t["d_grid"], MAX_ITERATIONS)
    if n < SERIAL_BELOW and not progress:
        _fit_on_one_thread(Y, method_code, args, out, status)
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
            fit_volume(Y[a:z], method_code, *args, chunk_count(z - a), out[a:z], status[a:z])
            rate = (z - a) / max(time.perf_counter() - t0, 1e-6)
            block = int(min(max(rate * BLOCK_SECONDS, PROGRESS_CHUNK), MAX_BLOCK))
            if bar is not None:
                bar.update(z - a)
            a = z
    finally:
        if bar is not None:
            bar.close()
    return out, status


def store_inside_bounds(out: np.ndarray, bounds) -> None:
    """Round the parameter columns of ``out`` (n_vox, >= 4) float32 inward onto the bounds.

    The kernels keep every estimate inside its float64 bounds, but storing a value fitted on a
    bound as float32 rounds to the nearest float32, which can lie outside (0.3 becomes
    0.30000001). This moves such values to the nearest float32 inside; it changes nothing else
    (a move of at most one float32 ulp), and NaN stays NaN.
    """
    lo32, hi32 = float32_bounds(bounds)
    params = out[:, : len(PARAM_NAMES)]
    np.clip(params, lo32, hi32, out=params)


def _fit_on_one_thread(Y, method_code, args, out, status):
    """Run the kernel on the calling thread only: waking the pool costs more than a few hundred
    voxels take (measured: 100 voxels ran at 18k voxels/s on 2 threads, 300k on 1)."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        fit_volume(Y, method_code, *args, 1, out, status)
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


def fit_voxels(Y, b_values, method="full", bounds=None, b_threshold=B_THRESHOLD, progress=False):
    """Fit the IVIM model to every row of a voxel × b matrix (the kernel entry for pipelines).

    Parameters
    ----------
    Y : array_like, shape (n_vox, n_b)
        Signal, one voxel per row. A C-contiguous float32/float64 array is used without a copy.
    b_values : array_like, shape (n_b,)
        b-values in s/mm², any order, repeats allowed; at least 4 distinct.
    method : {"full", "segmented"}
    bounds : dict, optional
        ``{"S0"|"f"|"D_star"|"D": (lower, upper)}`` over :data:`fastivim.DEFAULT_BOUNDS`.
    b_threshold : float
        s/mm²; samples at or above it give D in the segmented method (and its start).
    progress : bool
        Show a tqdm bar on stderr.

    Returns
    -------
    IVIMResult
        Every map of shape (n_vox,).
    """
    Y = np.asarray(Y)
    if Y.ndim != 2:
        raise ValueError(f"Y must be 2-D (n_vox, n_b), got shape {Y.shape}")
    return _fit(Y, None, b_values, method, bounds, b_threshold, progress, (Y.shape[0],))


def fit_ivim(signal, b_values, mask=None, method="segmented", bounds=None,
             b_threshold=B_THRESHOLD, progress=False):
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
    method : {"segmented", "full"}
        Two-step fit with D from the high-b samples, or all four parameters together.
    bounds : dict, optional
        ``{"S0"|"f"|"D_star"|"D": (lower, upper)}`` over the defaults; D_star > D always.
    b_threshold : float
        s/mm²: samples at or above it give D in the segmented method.
    progress : bool
        Show a tqdm progress bar on stderr.

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
    return _fit(signal, mask, b_values, method, bounds, b_threshold, progress, spatial)


def _fit(signal, mask, b_values, method, bounds, b_threshold, progress, spatial):
    opts = FitOptions(method=method, bounds=bounds, b_threshold=b_threshold)
    code = METHODS[opts.method]
    b = validate_b_values(b_values, signal.shape[-1])
    b_threshold = _check_threshold(b, opts.b_threshold, method)
    bounds = dict(opts.bounds)
    n_b = signal.shape[-1]
    if mask is None:
        Y = _as_kernel_matrix(signal.reshape(-1, n_b))
    else:
        Y = _as_kernel_matrix(signal[mask])
    out, status = _run_kernel(Y, code, b, bounds, b_threshold, progress)
    store_inside_bounds(out, bounds)
    maps = {}
    if mask is None:
        for k, name in enumerate(OUTPUT_COLUMNS):
            maps[name] = np.ascontiguousarray(out[:, k]).reshape(spatial)
        status_map = status.reshape(spatial)
    else:
        for k, name in enumerate(OUTPUT_COLUMNS):
            full = np.full(spatial, np.nan, dtype=np.float32)
            full[mask] = out[:, k]
            maps[name] = full
        status_map = np.full(spatial, st.OUTSIDE_MASK, dtype=np.uint8)
        status_map[mask] = status
    del out
    return IVIMResult(
        quality_mask=status_map == st.OK,
        status=status_map,
        method=method,
        bounds=bounds,
        b_values=b,
        b_threshold=b_threshold,
        **maps,
    )


__all__ = ["IVIMResult", "METHODS", "fit_ivim", "fit_voxels", "validate_b_values", "PARAM_NAMES"]
