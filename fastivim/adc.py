"""Apparent diffusion coefficient maps: mono-exponential fits beside the IVIM maps.

``S(b) = S0 exp(-b ADC)``, fitted by least squares on ``log S`` against b (every acquired
sample counts once, repeats included), in NumPy (no kernel to compile):

* ``ADC``: over **all** b-values, b = 0 included: the clinical ADC that scanners report. It
  includes the perfusion signal at low b, so in perfused tissue it exceeds D.
* ``ADC_high``: over the b-values >= ``b_threshold`` only: perfusion is negligible there, so it
  estimates D without the IVIM model (the segmented method's first step, without bounds).

A voxel with a non-positive or non-finite sample among those used gets NaN (its logarithm is
undefined); so does every voxel when fewer than 2 distinct b-values are used. Units: mm²/s for
b in s/mm².
"""

from __future__ import annotations

import numpy as np

#: The model of the ADC maps (their sidecars' ``Model``) and how it is fitted.
ADC_EQUATION = "S(b) = S0 * exp(-b * ADC)"
ADC_FIT = "log-linear least squares (mono-exponential)"

#: Result attributes (and map names), in column order.
ADC_COLUMNS = ("ADC", "ADC_high")

#: Rows converted to float64 logarithms at a time (keeps the float64 copy small).
ADC_ROWS = 1 << 16


def _slope_weights(b: np.ndarray, used: np.ndarray) -> np.ndarray | None:
    """Weights ``c`` (n_b,) with ``log(S) @ c`` the least-squares ADC over ``used`` samples,
    or None when they hold fewer than 2 distinct b-values."""
    bs = b[used]
    if np.unique(bs).size < 2:
        return None
    c = np.zeros(b.size)
    bc = bs - bs.mean()
    c[used] = -bc / float(bc @ bc)  # ADC = -slope
    return c


def adc_columns(Y: np.ndarray, b_values, b_threshold: float) -> np.ndarray:
    """``ADC`` and ``ADC_high`` of every row of ``Y``.

    The logarithms and the weighted sums are taken in float32 (the maps are stored as float32;
    the error this adds is ~1e-6 relative, and it keeps the maps' cost at ~0.05 µs per voxel,
    where float64 logarithms cost as much as the segmented fit itself).

    Parameters
    ----------
    Y : (n_vox, n_b) array
        Signal, any real dtype.
    b_values : (n_b,) array
        s/mm².
    b_threshold : float
        s/mm²: ``ADC_high`` uses the samples at or above it.

    Returns
    -------
    (2, n_vox) float32
        Rows in :data:`ADC_COLUMNS` order, mm²/s; NaN where undefined (see the module).
    """
    b = np.asarray(b_values, dtype=np.float64)
    n = Y.shape[0]
    cols = np.full((2, n), np.nan, dtype=np.float32)
    subsets = (np.ones(b.size, dtype=bool), b >= b_threshold)
    weights = []  # (row, float32 weights of the used samples, which samples)
    for k, used in enumerate(subsets):
        c = _slope_weights(b, used)
        if c is not None:
            weights.append((k, c[used].astype(np.float32), used))
    for a in range(0, n, ADC_ROWS):
        z = min(a + ADC_ROWS, n)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            logs = np.log(np.asarray(Y[a:z], dtype=np.float32))
            for k, c, used in weights:
                part = logs if used.all() else logs[:, used]
                # a non-finite log (a sample <= 0, NaN, inf) makes the sum non-finite
                v = part @ c
                cols[k, a:z] = np.where(np.isfinite(v), v, np.float32(np.nan))
    return cols
