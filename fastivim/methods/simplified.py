"""The ``simplified`` model, S(0) = S0 and S(b) = S0 (1 - f) exp(-b D) for b >= b_threshold,
fitted for the ``segmented`` and ``full`` methods alike (:mod:`fastivim.kernels.simplified`).
"""

from __future__ import annotations

import numpy as np

from ..kernels import simplified
from ..kernels.driver import chunk_count
from ..model import bounds_array
from . import MethodOutput
from ._blocks import run_in_float64_blocks
from .least_squares import OUTPUT_COLUMNS


def run(Y, req):
    """Fit the simplified model to every row of ``Y`` (n_vox, n_b): ``out`` has a NaN D_star
    column; ``sd`` (n_vox, 4) when ``req.uncertainty``."""
    n = Y.shape[0]
    out = np.empty((n, len(OUTPUT_COLUMNS)), dtype=np.float32)
    sd = np.empty((n, 4), dtype=np.float32)
    status = np.empty(n, dtype=np.uint8)
    if n:
        bu, groups = np.unique(req.b, return_inverse=True)
        w = np.bincount(groups).astype(np.float64)
        groups = groups.astype(np.int64)
        bounds = bounds_array(req.bounds)

        def fit_block(a, z, Y64):
            simplified.fit_simplified_volume(Y64, groups, bu * 1e-3, w, bu == 0,
                                             bu >= req.b_threshold, bounds,
                                             bool(req.uncertainty), chunk_count(z - a),
                                             out[a:z], sd[a:z], status[a:z])

        run_in_float64_blocks(Y, fit_block, False)
    return MethodOutput(out, status, sd if req.uncertainty else None, {"model": "simplified"})
