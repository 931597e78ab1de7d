"""fastivim as an OSIPI TF2.4 standardized algorithm (the IVIM-MRI code collection).

OSIPI TF2.4 (https://github.com/OSIPI/TF2.4_IVIM-MRI_CodeCollection) loads each fitter as a
class named like its file in ``src/standardized/``, a subclass of ``src.wrappers.OsipiBase``.
A two-line file registers fastivim there (this package imports nothing of OSIPI: the base
class is passed in)::

    # src/standardized/fastivim_full.py
    from src.wrappers.OsipiBase import OsipiBase; from fastivim.interop.osipi import osipi_algorithm
    fastivim_full = osipi_algorithm(OsipiBase, "full", "fastivim_full")

and the name goes into ``tests/IVIMmodels/unit_tests/algorithms.json``. Then
``OsipiBase(algorithm="fastivim_full", bvalues=b, bounds=...)`` fits with fastivim, through
OSIPI's ``osipi_fit`` (voxel by voxel, signals normalised to the lowest b-value) or
``osipi_fit_full_volume`` (every voxel in one compiled call).

The class follows TF2.4's standardized-algorithm contract: the ``id_*``, ``required_*`` and
``supported_*`` attributes, ``__init__(bvalues, thresholds, bounds, initial_guess)``
calling ``OsipiBase.__init__`` (OSIPI's default bounds and thresholds), ``use_bounds``,
``ivim_fit(signals)`` returning ``{"f", "Dp", "D"}`` for one voxel and
``ivim_fit_full_volume(data)`` returning those maps. Bounds are OSIPI's dict
``{"S0", "f", "Dp", "D": [lower, upper]}`` (D and Dp in mm²/s, b in s/mm², S0 relative to the
signal at the lowest b-value); the first of ``thresholds`` is fastivim's ``b_threshold``.

Where it differs from other OSIPI algorithms, and why
-----------------------------------------------------
* No initial guess is used (``supported_initial_guess = False``, ``use_initial_guess`` all
  False): fastivim's ``full`` method starts from its own grid and segmented estimates and
  keeps the best of several starts, and ``segmented`` needs none.
* ``ivim_fit_full_volume`` divides each voxel by its mean signal at the lowest b-value before
  fitting, as ``osipi_fit`` does voxel by voxel (OSIPI leaves the full-volume signal as it is),
  so that OSIPI's S0 bounds, which are relative, mean the same in both; f, D* and D do not
  depend on the scale.
* A voxel fastivim cannot fit (non-finite samples, no positive signal, a numerical failure)
  gives NaN, not a number from a failed optimiser.
"""

from __future__ import annotations

import sys

import numpy as np

from .. import __version__
from ..fit import fit_ivim, fit_voxels

#: fastivim's method for each OSIPI algorithm it can register, with OSIPI's description.
METHOD_TYPES = {
    "full": "Bi-exponential fit (bounded Levenberg-Marquardt of all four parameters, "
            "multi-start; fastivim)",
    "segmented": "Segmented fit (D from the high b-values, then f, D* and S0; fastivim)",
}

#: OSIPI's bounds keys and fastivim's.
BOUNDS_KEYS = {"S0": "S0", "f": "f", "Dp": "D_star", "D": "D"}


def _fastivim_bounds(bounds):
    """OSIPI's bounds dict (or None) as fastivim's ``{name: (lower, upper)}`` (or None)."""
    if bounds is None:
        return None
    out = {}
    for key, pair in dict(bounds).items():
        if key not in BOUNDS_KEYS:
            raise ValueError(f"unknown bounds key {key!r}; OSIPI's keys are "
                             f"{', '.join(BOUNDS_KEYS)}")
        lo, hi = (float(v) for v in pair)
        out[BOUNDS_KEYS[key]] = (lo, hi)
    return out


def normalise(signals, bvalues):
    """Each voxel divided by its mean signal at the lowest b-value (OSIPI's ``osipi_fit``
    normalisation); voxels where that mean is not positive become NaN (not fittable).

    Parameters
    ----------
    signals : array_like, shape (..., n_b)
    bvalues : array_like, shape (n_b,)

    Returns
    -------
    float64 array, shape (..., n_b)
    """
    y = np.asarray(signals, dtype=np.float64)
    b = np.asarray(bvalues, dtype=np.float64)
    ref = y[..., b == b.min()].mean(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ref > 0, y / ref, np.nan)


def osipi_algorithm(OsipiBase, method, name, module=None):
    """A TF2.4 standardized-algorithm class, subclass of ``OsipiBase``, fitting with fastivim.

    Parameters
    ----------
    OsipiBase : type
        TF2.4's ``src.wrappers.OsipiBase.OsipiBase`` (or a class with its interface).
    method : {"full", "segmented"}
        The fastivim method the algorithm runs (always passed explicitly to fastivim).
    name : str
        The class name: OSIPI looks the class up by the file's name, so use the file's stem
        (``"fastivim_full"`` in ``src/standardized/fastivim_full.py``).
    module : str, optional
        The class's ``__module__`` (default: the calling module), so that joblib can pickle
        instances for OSIPI's parallel ``osipi_fit(njobs > 1)``.

    Returns
    -------
    type
    """
    if method not in METHOD_TYPES:
        raise ValueError(f"unknown fastivim method {method!r} for an OSIPI algorithm; valid "
                         f"methods are {', '.join(METHOD_TYPES)}")
    if module is None:
        module = sys._getframe(1).f_globals.get("__name__", __name__)

    def __init__(self, bvalues=None, thresholds=None, bounds=None, initial_guess=None,
                 **kwargs):
        OsipiBase.__init__(self, bvalues=bvalues, thresholds=thresholds, bounds=bounds,
                           initial_guess=initial_guess, **kwargs)
        self.fastivim_method = method
        self.use_bounds = {"f": True, "D": True, "Dp": True, "S0": True}
        self.use_initial_guess = {"f": False, "D": False, "Dp": False, "S0": False}

    def _options(self, bvalues=None):
        b = self.bvalues if bvalues is None else np.asarray(bvalues)
        if b is None:
            raise ValueError("b-values must be provided at initialization (__init__)")
        th = getattr(self, "thresholds", None)
        options = {"method": method, "bounds": _fastivim_bounds(getattr(self, "bounds", None))}
        if th is not None and np.size(th):
            options["b_threshold"] = float(np.ravel(th)[0])
        return np.asarray(b, dtype=np.float64), options

    def ivim_fit(self, signals, bvalues=None, **kwargs):
        """Fit one voxel; return ``{"f", "Dp", "D"}`` (D and Dp in mm²/s) as floats."""
        b, options = self._options(bvalues)
        y = normalise(np.asarray(signals).reshape(1, -1), b)
        res = fit_voxels(y, b, **options)
        return {"f": float(res.f[0]), "Dp": float(res.D_star[0]), "D": float(res.D[0])}

    def ivim_fit_full_volume(self, data, bvalues=None, **kwargs):
        """Fit every voxel of ``data`` (..., n_b) in one call; return maps ``f``, ``Dp``,
        ``D`` (float64, ``data.shape[:-1]``; NaN where a voxel could not be fitted)."""
        b, options = self._options(bvalues)
        res = fit_ivim(normalise(data, b), b, adc=False, **options)  # f, Dp, D only
        return {"f": res.f.astype(np.float64), "Dp": res.D_star.astype(np.float64),
                "D": res.D.astype(np.float64)}

    namespace = {
        "__doc__": f"fastivim {__version__}, method {method!r}, as an OSIPI TF2.4 "
                   f"standardized algorithm (see fastivim.interop.osipi).",
        "__module__": module,
        "__qualname__": name,
        "id_author": "fastivim",
        "id_algorithm_type": METHOD_TYPES[method],
        "id_return_parameters": "f, D*, D",
        "id_units": "seconds per milli metre squared or milliseconds per micro metre squared",
        "id_ref": f"fastivim {__version__} (method {method!r})",
        "required_bvalues": 4,
        "required_thresholds": [0, 1],
        "required_bounds": False,
        "required_bounds_optional": True,
        "required_initial_guess": False,
        "required_initial_guess_optional": False,
        "supported_bounds": True,
        "supported_initial_guess": False,
        "supported_thresholds": True,
        "supported_dimensions": 4,
        "supported_priors": False,
        "__init__": __init__,
        "_options": _options,
        "ivim_fit": ivim_fit,
        "ivim_fit_full_volume": ivim_fit_full_volume,
    }
    return type(name, (OsipiBase,), namespace)


__all__ = ["BOUNDS_KEYS", "METHOD_TYPES", "normalise", "osipi_algorithm"]
