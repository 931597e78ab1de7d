"""Compilation options shared by every kernel, in one place.

Turning ``fastmath`` fully on would include the ``nnan``/``ninf`` flags, which let LLVM assume
no NaN or inf ever occurs: then ``np.isfinite`` checks that keep bad voxels from poisoning
results can be folded away. We keep only flags that cannot change results between runs.
"""

from numba import njit

#: Explicit fast-math flags: no ``nnan``/``ninf`` (NaN checks must stay true), no ``afn``
#: (approximate exp would cost accuracy near machine precision in noise-free fits), and no
#: ``reassoc``: it let LLVM order sums by the runtime alignment of scratch arrays, so the same
#: voxel could give different bits from one call to the next (and a tie between starts could
#: flip), for no measurable speed (tests/test_compile.py guards this).
FASTMATH_FLAGS = {"nsz", "arcp", "contract"}

#: Per-voxel helpers: compiled as part of the parallel kernel that calls them (and inlined there
#: by LLVM). Not cached on their own: the kernel's cache holds their code, and its stamp follows
#: their sources (see ``fastivim.kernels._drop_stale_cache``).
jit_voxel = njit(fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True)


def jit_parallel(func):
    """Compile a voxel-loop kernel with ``parallel=True`` (``prange``) and an on-disk cache."""
    return njit(
        parallel=True, cache=True, fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True
    )(func)
