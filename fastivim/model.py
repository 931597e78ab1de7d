"""The IVIM signal equation, parameter names and default bounds.

The bi-exponential IVIM model (Le Bihan et al., Radiology 1988,
doi:10.1148/radiology.168.2.3393671)::

    S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D))

with b in s/mm², D and D_star in mm²/s, f dimensionless and S0 in the signal's own units.
This module is the single home of the equation: simulation, residuals and tests call it.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

#: Parameter order used by every kernel output column: ``params[:, i]`` is ``PARAM_NAMES[i]``.
PARAM_NAMES = ("S0", "f", "D_star", "D")

#: Units of each parameter, for sidecars and reports.
PARAM_UNITS = {"S0": "arbitrary", "f": "fraction", "D_star": "mm^2/s", "D": "mm^2/s"}

#: Default bounds (lower, upper). D_star > D is enforced on top of these.
DEFAULT_BOUNDS = {
    "S0": (0.0, math.inf),
    "f": (0.0, 0.7),
    "D_star": (2e-3, 100e-3),
    "D": (0.1e-3, 5e-3),
}


def ivim_signal(b_values, S0, f, D_star, D):
    """Evaluate the IVIM model, broadcasting numpy-style.

    Parameters
    ----------
    b_values : array_like, shape (n_b,)
        b-values in s/mm². They form the last axis of the result.
    S0, f, D_star, D : array_like
        Parameters (S0 in signal units, f in [0, 1], D_star and D in mm²/s); any shapes that
        broadcast together. Each gets a trailing axis for the b-values.

    Returns
    -------
    numpy.ndarray, shape broadcast(S0, f, D_star, D).shape + (n_b,)
        ``S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D))`` in float64.
    """
    b = np.asarray(b_values, dtype=np.float64)
    S0, f, D_star, D = (np.asarray(p, dtype=np.float64)[..., None] for p in (S0, f, D_star, D))
    return S0 * (f * np.exp(-b * D_star) + (1.0 - f) * np.exp(-b * D))


def resolve_bounds(bounds: Mapping[str, tuple] | None = None) -> dict:
    """Merge user bounds over the defaults and validate them.

    Parameters
    ----------
    bounds : mapping of str to (lower, upper), optional
        Keys among ``S0``, ``f``, ``D_star``, ``D``. Missing keys keep their default.

    Returns
    -------
    dict
        Every key with a ``(float lower, float upper)`` pair.

    Raises
    ------
    ValueError
        Unknown key, a pair that is not two numbers, a non-finite lower bound, a lower bound
        above its upper bound, f outside [0, 1], or a negative S0/D/D_star bound; the message
        names the key.
    """
    merged = dict(DEFAULT_BOUNDS)
    if bounds is None:
        return merged
    for key, pair in dict(bounds).items():
        if key not in DEFAULT_BOUNDS:
            raise ValueError(
                f"unknown bounds key {key!r}; valid keys are {', '.join(PARAM_NAMES)}"
            )
        try:
            lo, hi = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(
                f"bounds[{key!r}] must be a pair (lower, upper), got {pair!r}"
            ) from None
        if not math.isfinite(lo):
            raise ValueError(f"bounds[{key!r}]: lower bound must be finite, got {lo}")
        if math.isnan(hi):
            raise ValueError(f"bounds[{key!r}]: upper bound is NaN")
        if lo > hi:
            raise ValueError(f"bounds[{key!r}]: lower bound {lo} is above upper bound {hi}")
        if lo < 0:
            raise ValueError(f"bounds[{key!r}]: lower bound must be >= 0, got {lo}")
        if key == "f" and hi > 1:
            raise ValueError(f"bounds['f']: upper bound must be <= 1, got {hi}")
        if key in ("D", "D_star") and not math.isfinite(hi):
            raise ValueError(f"bounds[{key!r}]: upper bound must be finite, got {hi}")
        merged[key] = (lo, hi)
    return merged


def bounds_array(bounds: Mapping[str, tuple]) -> np.ndarray:
    """Bounds as a ``(4, 2)`` float64 array in :data:`PARAM_NAMES` order (for the kernels)."""
    return np.array([bounds[k] for k in PARAM_NAMES], dtype=np.float64)
