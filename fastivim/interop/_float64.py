"""Least-squares parameters in float64, straight from the kernel's output rows.

fastivim's public API stores maps as float32 (:class:`fastivim.IVIMResult`), which holds
S0 = 1000 to about 6e-5. dipy's ``IvimFit.model_params`` are float64 and dipy's own tests
compare noise-free fits with ``decimal=6`` (S0 to 1e-9 relative), so the dipy adapter needs
the float64 values the kernel computes before fit.py rounds them.

The compiled kernel (:func:`fastivim.kernels.block.fit_volume_block`, the one
:func:`fastivim.fit_voxels` runs for ``segmented`` and ``full``) works in float64 and writes
its ``(n_vox, 6)`` output rows in the dtype of the array it is given:
:func:`fastivim.methods.least_squares.run_kernel` gives float32 by default, float64 here
(``out_dtype``). Everything else is fastivim's own: the options object and b-value checks of
:mod:`fastivim.fit`, and the kernel, tables, iteration limit, one-thread path for small inputs
and block loop of ``run_kernel``. So these parameters round to exactly the float32 maps of
``fastivim.fit_voxels`` with the same arguments (a parameter fitted on a bound may differ by
the one float32 ulp fit.py moves it inside); tests/test_interop_dipy.py checks this.
"""

from __future__ import annotations

import numpy as np

from .. import fit as _fit
from ..kernels.tables import METHOD_FULL, METHOD_SEGMENTED
from ..methods import least_squares as _ls
from ..options import FitOptions

#: Least-squares methods whose kernel rows this module can return, with their kernel code
#: (the Bayesian method has its own kernels and float32 outputs).
LS_METHODS = {"full": METHOD_FULL, "segmented": METHOD_SEGMENTED}


def fit_rows_float64(Y, b_values, method, bounds=None, b_threshold=_fit.B_THRESHOLD):
    """Fit every row of ``Y`` with fastivim's least-squares kernel; float64 parameters.

    Parameters
    ----------
    Y : array_like, shape (n_vox, n_b)
        Signal, one voxel per row (converted to C-contiguous float64: one compiled kernel
        specialisation serves every input dtype).
    b_values : array_like, shape (n_b,)
        s/mm².
    method : {"full", "segmented"}
        Passed explicitly, never defaulted (fastivim's defaults may change).
    bounds : dict, optional
        ``{"S0"|"f"|"D_star"|"D": (lower, upper)}`` over :data:`fastivim.DEFAULT_BOUNDS`.
    b_threshold : float
        s/mm², as in :func:`fastivim.fit_voxels`.

    Returns
    -------
    params : float64 array (n_vox, 4)
        S0, f, D_star, D (D and D_star in mm²/s); NaN rows where the voxel was not fitted.
    status : uint8 array (n_vox,)
        fastivim's status codes (:data:`fastivim.STATUS_MEANINGS`).

    Raises
    ------
    ValueError
        As :func:`fastivim.fit_voxels` (b-values, bounds, method).
    """
    if method not in LS_METHODS:
        raise ValueError(f"float64 parameters come from the least-squares methods "
                         f"({', '.join(LS_METHODS)}), not {method!r}")
    opts = FitOptions(method=method, bounds=bounds, b_threshold=b_threshold)
    Y = np.asarray(Y)
    if Y.ndim != 2:
        raise ValueError(f"Y must be 2-D (n_vox, n_b), got shape {Y.shape}")
    if Y.dtype.kind not in "fiub":
        raise ValueError(f"signal must be real numbers, got dtype {Y.dtype}")
    b = _fit.validate_b_values(b_values, Y.shape[1])
    b_threshold = _fit.check_fit_sampling(b, opts)
    out, status = _ls.run_kernel(Y, LS_METHODS[opts.method], b, dict(opts.bounds), b_threshold,
                                 False, out_dtype=np.float64)
    return np.ascontiguousarray(out[:, :4]), status
