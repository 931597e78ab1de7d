"""dipy's ``IvimModel`` on fastivim's kernel: switch with one import line.

::

    # from dipy.reconst.ivim import IvimModel
    from fastivim.interop.dipy import IvimModel

    ivimfit = IvimModel(gtab, fit_method="trr").fit(data, mask=mask)
    ivimfit.model_params        # (..., 4): S0, f, D_star, D (mm²/s), float64
    ivimfit.perfusion_fraction, ivimfit.D_star, ivimfit.D, ivimfit.S0_predicted
    ivimfit.predict(gtab)       # (..., n_b)

The model and fit objects keep dipy's names, parameter order ``[S0, f, D*, D]``, units (b in
s/mm², D and D* in mm²/s), shapes, indexing and errors (``dipy.reconst.ivim``, dipy 1.12).
dipy is not imported: ``gtab`` may be a dipy ``GradientTable`` or anything with ``.bvals``.

Where it differs from dipy, and why
-----------------------------------
* ``fit_method``: dipy's ``"trr"`` (two-stage: linear estimates, then Trust Region Reflective
  least squares of all four parameters) and ``"varpro"`` (Variable Projection with cvxpy; no
  cvxpy needed here) both run fastivim's ``"full"`` method: bounded Levenberg-Marquardt of all
  four parameters from several starts (the same least-squares objective, minimised to its
  minimum; on dipy's noise-free test voxel every parameter comes back within 4e-10 of the
  truth, relative, in float64). fastivim's own names
  ``"full"`` and ``"segmented"`` are accepted too. An unknown name warns and uses ``"full"``,
  as dipy warns and uses TRR. ``two_stage=False`` (dipy: the linear estimates only) runs
  ``"segmented"``, fastivim's fast two-step estimate; its numbers are not dipy's linear ones.
* Optimiser settings dipy passes to scipy (``tol``, ``x_scale``, ``gtol``, ``ftol``, ``eps``,
  ``maxiter``, ``xtol``, ``split_b_S0``) are accepted and not used: fastivim's solver has its
  own convergence rules. ``split_b_D`` is fastivim's ``b_threshold`` (the b-value from which
  D is estimated first; it sets the start of ``"full"`` and the first step of
  ``"segmented"``).
* Bounds: dipy's form ``([S0, f, D*, D] lower, [S0, f, D*, D] upper)`` and default
  ``([0, 0, 0, 0], [inf, 0.2, 1, 1])``. fastivim also keeps ``D* > D`` and refuses bounds dipy
  would take but that cannot be IVIM (f above 1, a diffusivity bound above 1 mm²/s, an empty
  interval) with a ``ValueError`` naming the bound.
* A voxel that cannot be fitted (non-finite samples, no positive signal, a numerical failure)
  gets NaN parameters rather than dipy's linear-fit fallback and its warnings; ``fit.status``
  (extra, fastivim's codes in :data:`fastivim.STATUS_MEANINGS`) says why. Voxels outside the
  mask get zeros, as in dipy.
* A multi-voxel fit is one object (dipy returns a ``MultiVoxelFit``) with the same attributes,
  ``predict``, ``shape`` and indexing; indexing a voxel outside the mask gives its zero
  parameters (dipy gives None).
* ``predict(gtab, S0=1.0)`` ignores ``S0`` and uses the fitted S0, exactly as dipy does.
* The fit runs in compiled parallel code on every voxel at once (dipy fits voxel by voxel in
  scipy): ``bench/bench_interop.py`` measures the ratio.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..model import ivim_signal
from ._float64 import fit_rows_float64

#: dipy's default bounds (``dipy.reconst.ivim.BOUNDS``): [S0, f, D*, D] lower and upper.
BOUNDS = ([0.0, 0.0, 0.0, 0.0], [np.inf, 0.2, 1.0, 1.0])

#: dipy's fit-method names (case-insensitive, as in dipy) and fastivim's own, with the
#: fastivim method each runs.
FIT_METHODS = {"trr": "full", "varpro": "full", "full": "full", "segmented": "segmented"}

#: dipy's parameter order of ``model_params`` (fastivim's :data:`fastivim.PARAM_NAMES` too).
PARAM_ORDER = ("S0", "f", "D_star", "D")

#: dipy keyword arguments that tune its scipy optimisers; accepted and not used.
IGNORED_OPTIONS = ("split_b_S0", "tol", "x_scale", "gtol", "ftol", "eps", "maxiter", "xtol")

_UNKNOWN_METHOD = ("The fit_method option chosen was not correct. Using fit_method: TRR "
                   "instead...")


def _b0_checks(gtab, bvals):
    """dipy's refusals of a gradient table (same order, same messages)."""
    b0_threshold = float(getattr(gtab, "b0_threshold", 0.0))
    b0s_mask = getattr(gtab, "b0s_mask", None)
    if b0s_mask is None:
        b0s_mask = bvals <= b0_threshold
    if not np.any(b0s_mask):
        raise ValueError("No measured signal at bvalue == 0.The IVIM model requires signal "
                         "measured at 0 bvalue")
    if b0_threshold > 0:
        raise ValueError(
            "The IVIM model requires a measurement at b==0. As of version 0.15, the default "
            "b0_threshold for the GradientTable object is set to 50, so if you used the default "
            "settings to initialize the gtab input to the IVIM model, you may have provided a "
            "gtab with b0_threshold larger than 0. Please initialize the gtab input with "
            "b0_threshold=0")


def _bounds_dict(bounds):
    """dipy's ``(lower[4], upper[4])`` as fastivim's ``{name: (lower, upper)}``."""
    try:
        lo, hi = (np.asarray(v, dtype=np.float64).reshape(-1) for v in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be (lower, upper), each 4 numbers in the order "
                         f"{list(PARAM_ORDER)}, got {bounds!r}") from None
    if lo.size != 4 or hi.size != 4:
        raise ValueError(f"bounds must be (lower, upper), each 4 numbers in the order "
                         f"{list(PARAM_ORDER)}, got {lo.size} and {hi.size}")
    return {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(PARAM_ORDER)}


def ivim_prediction(params, gtab):
    """dipy's IVIM model function: ``S0 (f exp(-b D*) + (1 - f) exp(-b D))``.

    Parameters
    ----------
    params : array_like, shape (..., 4)
        ``[S0, f, D*, D]`` per voxel (dipy's order; D and D* in mm²/s).
    gtab : GradientTable or object with ``.bvals``
        b-values in s/mm².

    Returns
    -------
    float64 array, shape (..., n_b)
        (dipy's own function takes a single voxel's 4 parameters; this one broadcasts.)
    """
    p = np.asarray(params, dtype=np.float64)
    return ivim_signal(np.asarray(gtab.bvals), p[..., 0], p[..., 1], p[..., 2], p[..., 3])


class IvimModel:
    """dipy's IVIM model, fitted by fastivim's compiled least-squares kernel.

    Parameters
    ----------
    gtab : dipy GradientTable, or any object with ``bvals`` (s/mm²)
        Must hold a b = 0 measurement and have ``b0_threshold == 0`` (dipy's rule; an object
        without ``b0_threshold`` counts as 0).
    fit_method : str
        dipy's ``"trr"`` or ``"varpro"`` (any case), or fastivim's ``"full"`` or
        ``"segmented"``; see the module docstring for what runs.
    bounds : (lower, upper), optional
        Each 4 numbers in dipy's order ``[S0, f, D*, D]``; default :data:`BOUNDS` (dipy's).
    split_b_D : float
        s/mm²: fastivim's ``b_threshold`` (dipy's default 400).
    two_stage : bool
        False runs the ``"segmented"`` method (dipy: linear estimates only).
    **kwargs
        dipy's optimiser settings (:data:`IGNORED_OPTIONS`): accepted, not used. Anything
        else is a ``TypeError``, as in dipy.

    Raises
    ------
    ValueError
        No b = 0 in ``gtab``, ``b0_threshold > 0`` (dipy's messages), b-values fastivim cannot
        fit (too few, units implausible) or bounds fastivim refuses.
    """

    def __init__(self, gtab, fit_method="trr", bounds=None, *, split_b_D=400.0, two_stage=True,
                 **kwargs):
        unknown = sorted(set(kwargs) - set(IGNORED_OPTIONS))
        if unknown:
            raise TypeError(f"IvimModel got unexpected keyword argument(s) {unknown}")
        bvals = np.asarray(gtab.bvals, dtype=np.float64)
        _b0_checks(gtab, bvals)
        method = FIT_METHODS.get(str(fit_method).lower())
        if method is None:
            warnings.warn(_UNKNOWN_METHOD, UserWarning, stacklevel=2)
            method = "full"
        if not two_stage:
            method = "segmented"
        self.gtab = gtab
        self.bvals = bvals
        self.fit_method = fit_method
        self.method = method
        self.bounds = BOUNDS if bounds is None else bounds
        self.split_b_D = float(split_b_D)
        self.two_stage = bool(two_stage)
        self._bounds = _bounds_dict(self.bounds)
        # the checks fastivim makes before a fit, made now so a bad model fails where it is
        # built (as dipy's refusals do): b-values, bounds, sampling for the method
        fit_rows_float64(np.empty((0, bvals.size)), bvals, self.method, self._bounds,
                         self.split_b_D)

    def fit(self, data, mask=None, **kwargs):
        """Fit every voxel of ``data`` (or those in ``mask``).

        Parameters
        ----------
        data : array_like, shape (..., n_b)
            One voxel (1-D) or any number of spatial axes; any real dtype.
        mask : array_like of bool, shape data.shape[:-1], optional
            Voxels to fit (others get zero parameters, as in dipy).
        **kwargs
            dipy's multi-voxel options (``engine``, ``n_jobs``, ``verbose``...): accepted, not
            used (the kernel is always parallel).

        Returns
        -------
        IvimFit

        Raises
        ------
        ValueError
            ``mask`` of another shape ("mask and data shape do not match", dipy's message), or
            a signal whose last axis is not the b-values.
        """
        data = np.asarray(data)
        if data.ndim == 0 or data.shape[-1] != self.bvals.size:
            raise ValueError(f"data must have the {self.bvals.size} b-values along its last "
                             f"axis, got shape {data.shape}")
        spatial = data.shape[:-1]
        if data.ndim == 1:  # dipy fits a single voxel without its mask
            mask = None
        elif mask is not None:
            mask = np.asarray(mask)
            if mask.shape != spatial:
                raise ValueError("mask and data shape do not match")
            # any non-zero voxel is in, NaN is out (as fastivim.fit_ivim reads masks)
            mask = (np.nan_to_num(mask, nan=0.0) != 0 if mask.dtype.kind == "f"
                    else mask.astype(bool))
        Y = data.reshape(-1, self.bvals.size) if mask is None else data[mask]
        params, status = fit_rows_float64(Y, self.bvals, self.method, self._bounds,
                                          self.split_b_D)
        if mask is None:
            model_params = params.reshape(spatial + (4,))
            status_map = status.reshape(spatial)
        else:
            model_params = np.zeros(spatial + (4,))
            model_params[mask] = params
            status_map = np.full(spatial, _outside_mask_code(), dtype=np.uint8)
            status_map[mask] = status
        return IvimFit(self, model_params, status_map)

    def predict(self, ivim_params, gtab, S0=1.0):
        """The signal of parameters ``[S0, f, D*, D]`` (..., 4) at ``gtab``'s b-values.

        ``S0`` is not used (the parameters hold S0), as in dipy.
        """
        return ivim_prediction(ivim_params, gtab)


def _outside_mask_code() -> int:
    from ..kernels.status import OUTSIDE_MASK

    return OUTSIDE_MASK


class IvimFit:
    """The result of :meth:`IvimModel.fit`, with dipy's ``IvimFit`` interface.

    Attributes
    ----------
    model : IvimModel
    model_params : float64 array (..., 4)
        ``[S0, f, D*, D]`` per voxel (D and D* in mm²/s); zeros outside the mask, NaN where the
        voxel could not be fitted.
    status : uint8 array (...) or None
        fastivim's per-voxel status (:data:`fastivim.STATUS_MEANINGS`; 0 = fitted and passed
        the quality checks). Not in dipy.
    """

    def __init__(self, model, model_params, status=None):
        self.model = model
        self.model_params = np.asarray(model_params)
        self.status = status

    def __getitem__(self, index):
        """A voxel or a sub-volume, indexed as dipy indexes its fits.

        One voxel (``model_params`` of shape (4,)): dipy's ``IvimFit`` rule, an index tuple
        as long as the parameter array is an ``IndexError``. Several voxels: the spatial axes
        are indexed with NumPy's rules (as dipy's ``MultiVoxelFit`` indexes its array of
        fits), so an index out of range, a float or too many indices is an ``IndexError``.
        """
        params = self.model_params
        if params.ndim == 1:  # dipy's IvimFit.__getitem__
            if type(index) is not tuple:
                index = (index,)
            elif len(index) >= params.ndim:
                raise IndexError("IndexError: invalid index")
            index = index + (slice(None),) * (params.ndim - len(index))
            return type(self)(self.model, params[index])
        spatial = params.shape[:-1]
        where = np.arange(int(np.prod(spatial))).reshape(spatial)[index]
        flat = params.reshape(-1, 4)
        status = None if self.status is None else self.status.reshape(-1)[where]
        return type(self)(self.model, flat[where], status)

    @property
    def S0_predicted(self):
        """S0, in the signal's units."""
        return self.model_params[..., 0]

    @property
    def perfusion_fraction(self):
        """f."""
        return self.model_params[..., 1]

    @property
    def D_star(self):
        """D*, mm²/s."""
        return self.model_params[..., 2]

    @property
    def D(self):
        """D, mm²/s."""
        return self.model_params[..., 3]

    @property
    def shape(self):
        """Spatial shape of the fit (``()`` for one voxel)."""
        return self.model_params.shape[:-1]

    def predict(self, gtab, S0=1.0):
        """The fitted signal at ``gtab``'s b-values, shape (..., n_b).

        ``S0`` is not used (the fit holds S0), as in dipy.
        """
        return ivim_prediction(self.model_params, gtab)


__all__ = ["BOUNDS", "FIT_METHODS", "IvimFit", "IvimModel", "ivim_prediction"]
