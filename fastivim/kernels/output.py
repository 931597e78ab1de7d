"""From the kernels' (n_vox, k) output rows to one contiguous float32 array per map, in parallel.

The fitting kernels write one row per voxel (S0, f, D_star, D, R², RMSE). Splitting that into
the result's column arrays with NumPy (``np.ascontiguousarray(out[:, k])`` per column, after a
``np.clip`` of the parameter columns) ran on one thread at about 45 ns per voxel, 10⁶ voxels:
as much as the segmented kernel itself on two threads. Here the split and the float32 bound
rounding are one pass over the rows, split across threads.
"""

import math

from numba import prange

from ._jit import jit_parallel
from .status import NUMERICAL_FAILURE


@jit_parallel
def split_columns(out, lo32, hi32, n_chunks, cols, status):
    """Write ``out`` (n_vox, k) float32 transposed into ``cols`` (k, n_vox) float32.

    The first ``lo32.shape[0]`` columns (the parameters) are clipped to ``[lo32, hi32]``
    (float32, one per column) on the way, as ``np.clip`` does (NaN stays NaN): a value fitted
    on a float64 bound can round, as float32, to just outside it.

    A parameter that is infinite overflowed float32 when the kernel stored its float64 estimate
    (signals near the float32 maximum: an S0 above 3.4e38): that voxel is a numerical failure,
    its whole row NaN and ``status[v]`` (n_vox,) uint8 set to NUMERICAL_FAILURE, whichever
    method fitted it. NaN is never such a sign (failed voxels and the simplified model's D_star
    are NaN by design).
    """
    n = out.shape[0]
    k = out.shape[1]
    n_p = lo32.shape[0]
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        # one pass over the rows (each read once), writing k streams
        for v in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            overflow = False
            for j in range(n_p):
                x = out[v, j]
                overflow |= math.isinf(x)
                x = lo32[j] if x < lo32[j] else x
                cols[j, v] = hi32[j] if x > hi32[j] else x
            for j in range(n_p, k):
                cols[j, v] = out[v, j]
            if overflow:
                for j in range(k):
                    cols[j, v] = math.nan
                status[v] = NUMERICAL_FAILURE
