"""Least-squares parameters in float64, straight from the kernel's output rows.

fastivim's public API stores maps as float32 (:class:`fastivim.IVIMResult`), which holds
S0 = 1000 to about 6e-5. dipy's ``IvimFit.model_params`` are float64 and dipy's own tests
compare noise-free fits with ``decimal=6`` (S0 to 1e-9 relative), so the dipy adapter needs
the float64 values the kernel computes before fit.py rounds them.

The compiled kernel (:func:`fastivim.kernels.block.fit_volume_block`, the one
:func:`fastivim.fit_voxels` runs for ``segmented`` and ``full``) works in float64 and writes
its ``(n_vox, 6)`` output rows in the dtype of the array it is given:
:func:`fastivim.methods.least_squares.run_kernel` gives float32, :func:`fit_rows_float64`
gives float64. Everything else is fastivim's own: the options object and b-value checks of
:mod:`fastivim.fit`, and the kernel, tables, iteration limit, one-thread path for small inputs
and block loop of :mod:`fastivim.methods.least_squares`. So these parameters round to exactly
the float32 maps of ``fastivim.fit_voxels`` with the same arguments (a parameter fitted on a
bound may differ by the one float32 ulp fit.py moves it inside); tests/test_interop_dipy.py
checks this.

This module reaches into private helpers; it is kept in one place so that, if
``run_kernel`` gains an output-dtype argument, it becomes a one-line call.
"""

from __future__ import annotations

import numpy as np

from .. import fit as _fit
from ..kernels.driver import chunk_count
from ..kernels.tables import METHOD_FULL, METHOD_SEGMENTED, make_settings, make_tables
from ..methods import least_squares as _ls
from ..methods._blocks import run_in_blocks
from ..model import bounds_array
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
    Y = np.ascontiguousarray(Y, dtype=np.float64)
    b = _fit.validate_b_values(b_values, Y.shape[1])
    b_threshold = _fit.check_fit_sampling(b, opts)
    n = Y.shape[0]
    out = np.empty((n, len(_ls.OUTPUT_COLUMNS)), dtype=np.float64)
    status = np.empty(n, dtype=np.uint8)
    if n:
        run = _ls.kernel_function("block")  # also runs the stale-cache check
        tables = make_tables(b, bounds_array(dict(opts.bounds)))
        settings = make_settings(LS_METHODS[opts.method], b_threshold, _ls.MAX_ITERATIONS)
        if n < _ls.SERIAL_BELOW:
            _ls._fit_on_one_thread(run, Y, tables, settings, out, status)
        else:
            def fit_block(a, z):
                run(Y[a:z], tables, settings, chunk_count(z - a), out[a:z], status[a:z])

            run_in_blocks(n, fit_block, False)
    return np.ascontiguousarray(out[:, :4]), status
