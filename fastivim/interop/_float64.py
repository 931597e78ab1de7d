"""Least-squares parameters in float64, straight from the kernel's output rows.

fastivim's public API stores maps as float32 (:class:`fastivim.IVIMResult`), which holds
S0 = 1000 to about 6e-5. dipy's ``IvimFit.model_params`` are float64 and dipy's own tests
compare noise-free fits with ``decimal=6`` (S0 to 1e-9 relative), so the dipy adapter needs
the float64 values the kernel computes before fit.py rounds them.

The compiled kernel (:func:`fastivim.kernels.block.fit_volume_block`, the one
:func:`fastivim.fit_voxels` runs) works in float64 and writes its ``(n_vox, 6)`` output rows
in the dtype of the array it is given: fit.py gives float32, :func:`fit_rows_float64` gives
float64. Everything else is fit.py's own: the options object, b-value checks, bounds, tables,
iteration limit and the one-thread path for small inputs. So these parameters round to exactly
the float32 maps of ``fastivim.fit_voxels`` with the same arguments (a parameter fitted on a
bound may differ by the one float32 ulp fit.py moves it inside); tests/test_interop_dipy.py
checks this.

This module reaches into fit.py's private helpers; it is kept in one place so that, if fit.py
gains a private ``_out_dtype`` keyword, it becomes a one-line call.
"""

from __future__ import annotations

import numpy as np

from .. import fit as _fit
from ..kernels.driver import chunk_count
from ..kernels.tables import make_settings, make_tables
from ..model import bounds_array
from ..options import FitOptions

#: Least-squares methods whose kernel rows this module can return (the Bayesian method has
#: its own kernels and float32 outputs).
LS_METHODS = ("full", "segmented")

#: Voxels per kernel call: Python sees Ctrl-C between calls (about 0.1-0.3 s each).
BLOCK = 1 << 17


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
    Y = np.ascontiguousarray(Y, dtype=np.float64)
    b = _fit.validate_b_values(b_values, Y.shape[1])
    b_threshold = _fit.check_fit_sampling(b, opts)
    n = Y.shape[0]
    out = np.empty((n, len(_fit.OUTPUT_COLUMNS)), dtype=np.float64)
    status = np.empty(n, dtype=np.uint8)
    if n:
        run = _fit._kernel_function("block")  # also runs the stale-cache check
        tables = make_tables(b, bounds_array(dict(opts.bounds)))
        settings = make_settings(_fit.METHODS[opts.method], b_threshold, _fit.MAX_ITERATIONS)
        if n < _fit.SERIAL_BELOW:
            _fit._fit_on_one_thread(run, Y, tables, settings, out, status)
        else:
            for a in range(0, n, BLOCK):
                z = min(a + BLOCK, n)
                run(Y[a:z], tables, settings, chunk_count(z - a), out[a:z], status[a:z])
    return np.ascontiguousarray(out[:, :4]), status
