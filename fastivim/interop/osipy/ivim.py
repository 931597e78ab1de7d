"""osipy's ``osipy.ivim`` on fastivim: ``fit_ivim``, ``FittingMethod``, ``IVIMFitParams``.

::

    # from osipy.ivim import FittingMethod, IVIMFitParams
    from fastivim.interop.osipy.ivim import FittingMethod, IVIMFitParams

Same names, parameter order (``fit_ivim(signal, b_values, mask=None, params=None,
method=None, progress_callback=None)``), units (b in s/mm², D and D* in mm²/s) and result
(``IVIMFitResult`` with ``ParameterMap`` attributes ``d_map``, ``d_star_map``, ``f_map``,
``s0_map`` holding ``.values``, plus ``quality_mask``, ``r_squared``, ``rmse_map``,
``fitting_stats``) as osipy 0.1's IVIM tutorial uses them. The maps are exactly
:func:`fastivim.fit_ivim`'s with the same method, mask, bounds and ``b_threshold``.

Where it differs from osipy, and why
------------------------------------
* The fit is fastivim's: ``SEGMENTED``, ``FULL`` and ``BAYESIAN`` run fastivim's methods of
  those names (its own solvers and Bayesian estimator, not osipy's Levenberg-Marquardt and
  MAP fitters). ``IVIMFitParams.max_iterations`` and ``tolerance`` are accepted and not used
  (fastivim's solvers have their own convergence rules); ``bayesian_params`` likewise.
* Bounds: osipy's keys ``"D"``, ``"D*"`` (or ``"D_star"``, as the tutorial writes), ``"f"``,
  ``"S0"``; keys not given keep fastivim's defaults (:data:`fastivim.DEFAULT_BOUNDS`, the same
  ranges as osipy's documented defaults: D [0.1, 5]e-3, D* [2, 100]e-3, f [0, 0.7], S0 [0, inf]).
  Bounds that cannot be IVIM are refused (:func:`fastivim.resolve_bounds`).
* Maps are float32 and NaN outside the mask and where a voxel could not be fitted (fastivim's
  maps, unchanged); ``quality_mask`` is fastivim's (converged, finite, D* > D, no parameter on
  a bound: ``status == 0``). D* > D is kept by the fit itself, so no values are swapped after.
* ``fit_ivim`` does not change the ``params`` it is given (osipy sets ``params.method`` to
  ``method``).
* ``progress_callback`` is called once with 1.0 when the fit is done (the compiled fit has no
  per-voxel callback).
* Errors: a b-value count that does not match the signal, fewer than 4 b-values and every
  refusal of :func:`fastivim.fit_ivim` raise :class:`FittingError` (osipy's name; here a
  ``ValueError``), with fastivim's one-line reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from ...fit import B_THRESHOLD
from ...fit import fit_ivim as _fastivim_fit_ivim
from ...model import PARAM_UNITS


class FittingError(ValueError):
    """An IVIM fit that cannot run (osipy's ``FittingError``; a ``ValueError`` here)."""


class FittingMethod(Enum):
    """IVIM fitting methods (osipy's names and values), each run by fastivim's method of the
    same name."""

    SEGMENTED = "segmented"
    FULL = "full"
    BAYESIAN = "bayesian"


#: osipy's bounds keys and fastivim's.
BOUNDS_KEYS = {"D": "D", "D*": "D_star", "D_star": "D_star", "f": "f", "S0": "S0"}


@dataclass
class IVIMFitParams:
    """Parameters for IVIM fitting (osipy's fields and defaults).

    Attributes
    ----------
    method : FittingMethod
    b_threshold : float
        s/mm²: b-values at or above it give D in the segmented fit (osipy's and fastivim's
        default, 200).
    max_iterations, tolerance : accepted, not used (fastivim's solvers' own rules).
    bounds : dict, optional
        ``{"D"|"D*"|"D_star"|"f"|"S0": (lower, upper)}``; missing keys keep the defaults.
    bayesian_params : accepted, not used.
    """

    method: FittingMethod = FittingMethod.SEGMENTED
    b_threshold: float = B_THRESHOLD
    max_iterations: int = 500
    tolerance: float = 1e-6
    bounds: dict | None = None
    bayesian_params: Any = None


@dataclass
class ParameterMap:
    """One parameter map (osipy's ``ParameterMap`` fields the tutorial reads and the writer
    needs).

    Attributes
    ----------
    name, symbol, units : str
    values : float32 array
        The map, ``signal.shape[:-1]``.
    affine : (4, 4) array
        Identity (the fit sees a bare array, as in osipy).
    quality_mask : bool array
    model_name, fitting_method : str
    """

    name: str
    symbol: str
    units: str
    values: np.ndarray
    affine: np.ndarray
    quality_mask: np.ndarray
    model_name: str = "IVIM bi-exponential"
    fitting_method: str = ""
    #: the fastivim result and attribute this map came from (for :func:`export_bids`)
    _result: Any = field(default=None, repr=False, compare=False)
    _attr: str = field(default="", repr=False, compare=False)

    @property
    def valid_fraction(self) -> float:
        """Share of voxels in the quality mask."""
        q = np.asarray(self.quality_mask)
        return float(q.mean()) if q.size else 0.0


@dataclass
class IVIMFitResult:
    """Result of :func:`fit_ivim` (osipy's fields).

    Attributes
    ----------
    d_map, d_star_map, f_map, s0_map : ParameterMap
        D and D* in mm²/s, f a fraction, S0 in the signal's units.
    quality_mask : bool array
    r_squared : float32 array
    rmse_map : ParameterMap
    fitting_stats : dict
        ``n_voxels_total``, ``n_voxels_fitted``, ``fit_success_rate`` and the mean and SD of
        D, D*, f in the quality mask (osipy's keys).
    result : fastivim.IVIMResult
        The fastivim result itself (not in osipy).
    """

    d_map: ParameterMap
    d_star_map: ParameterMap
    f_map: ParameterMap
    s0_map: ParameterMap
    quality_mask: np.ndarray
    r_squared: np.ndarray | None = None
    rmse_map: ParameterMap | None = None
    fitting_stats: dict = field(default_factory=dict)
    result: Any = field(default=None, repr=False)


def _bounds(bounds) -> dict | None:
    if bounds is None:
        return None
    out = {}
    for key, pair in dict(bounds).items():
        if key not in BOUNDS_KEYS:
            raise FittingError(f"unknown bounds key {key!r}; valid keys are "
                               f"{', '.join(BOUNDS_KEYS)}")
        out[BOUNDS_KEYS[key]] = tuple(pair)
    return out


def _method_name(method) -> str:
    if isinstance(method, FittingMethod):
        return method.value
    try:
        return FittingMethod(str(method)).value
    except ValueError:
        raise FittingError(f"unknown IVIM fitting method {method!r}; valid methods are "
                           f"{', '.join(m.value for m in FittingMethod)}") from None


def _map(result, attr, name, symbol, units, method) -> ParameterMap:
    return ParameterMap(name=name, symbol=symbol, units=units, values=getattr(result, attr),
                        affine=np.eye(4), quality_mask=result.quality_mask,
                        fitting_method=method, _result=result, _attr=attr)


def _stats(result) -> dict:
    q = np.asarray(result.quality_mask)
    stats = {"n_voxels_total": int(q.size), "n_voxels_fitted": int(q.sum()),
             "fit_success_rate": float(q.sum()) / q.size if q.size else math.nan}
    for name, m in (("D", result.D), ("D*", result.D_star), ("f", result.f)):
        v = np.asarray(m, dtype=np.float64)[q]
        if v.size:
            stats[f"{name}_mean"] = float(v.mean())
            stats[f"{name}_std"] = float(v.std())
    return stats


def fit_ivim(signal, b_values, mask=None, params=None, method=None, progress_callback=None
             ) -> IVIMFitResult:
    """Fit the IVIM model to DWI data (osipy's signature), with :func:`fastivim.fit_ivim`.

    Parameters
    ----------
    signal : array_like, shape (..., n_b)
        DWI signal, b-values along the last axis.
    b_values : array_like, shape (n_b,)
        s/mm².
    mask : array_like of bool, shape signal.shape[:-1], optional
    params : IVIMFitParams, optional
        Method, ``b_threshold`` and bounds (default: ``IVIMFitParams()``).
    method : FittingMethod, optional
        Overrides ``params.method``.
    progress_callback : callable, optional
        Called with 1.0 when the fit is done.

    Returns
    -------
    IVIMFitResult

    Raises
    ------
    FittingError
        Mismatched or too few b-values, or any input :func:`fastivim.fit_ivim` refuses.
    """
    params = params or IVIMFitParams()
    name = _method_name(method if method is not None else params.method)
    signal = np.asarray(signal)
    b = np.asarray(b_values)
    if signal.ndim == 0 or signal.shape[-1] != len(b):
        raise FittingError(f"Signal last dimension ({signal.shape[-1] if signal.ndim else 0}) "
                           f"!= number of b-values ({len(b)})")
    if len(b) < 4:
        raise FittingError(f"IVIM fitting requires at least 4 b-values (OSIPI TF2.4), got "
                           f"{len(b)}")
    try:
        # osipy's result has no ADC maps: not computed (nor exported) through this door
        result = _fastivim_fit_ivim(signal, b, mask=mask, method=name,
                                    bounds=_bounds(params.bounds),
                                    b_threshold=params.b_threshold, adc=False)
    except ValueError as exc:
        raise FittingError(str(exc)) from None
    if progress_callback is not None:
        progress_callback(1.0)
    units = PARAM_UNITS
    return IVIMFitResult(
        d_map=_map(result, "D", "D", "D", units["D"], name),
        d_star_map=_map(result, "D_star", "D*", "D*", units["D_star"], name),
        f_map=_map(result, "f", "f", "f", units["f"], name),
        s0_map=_map(result, "S0", "S0", "S0", units["S0"], name),
        quality_mask=result.quality_mask,
        r_squared=result.r_squared,
        rmse_map=_map(result, "rmse", "RMSE", "RMSE", "a.u.", name),
        fitting_stats=_stats(result),
        result=result,
    )


__all__ = ["FittingError", "FittingMethod", "IVIMFitParams", "IVIMFitResult", "ParameterMap",
           "fit_ivim"]
