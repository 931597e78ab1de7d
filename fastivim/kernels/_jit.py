"""Compilation options shared by every kernel, in one place.

``fastmath=True`` would include the ``nnan``/``ninf`` flags, which let LLVM assume no NaN or inf
ever occurs: then ``np.isfinite`` checks that keep bad voxels from poisoning results can be
folded away. We keep only the flags that reorder or contract arithmetic.
"""

from numba import njit

#: Explicit fast-math flags: no ``nnan``/``ninf`` (NaN checks must stay true), no ``afn``
#: (approximate exp would cost accuracy near machine precision in noise-free fits).
FASTMATH_FLAGS = {"nsz", "arcp", "contract", "reassoc"}

#: Per-voxel helpers: compiled, cached, inlined into the parallel loops by LLVM.
jit_voxel = njit(cache=True, fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True)


def jit_parallel(func):
    """Compile a voxel-loop kernel with ``parallel=True`` (``prange``) and an on-disk cache."""
    return njit(
        parallel=True, cache=True, fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True
    )(func)
