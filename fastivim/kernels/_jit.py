"""Compilation options shared by every kernel, in one place.

Turning ``fastmath`` fully on would include the ``nnan``/``ninf`` flags, which let LLVM assume
no NaN or inf ever occurs: then ``np.isfinite`` checks that keep bad voxels from poisoning
results can be folded away. We keep only flags that cannot change results between runs.
"""

from numba import njit
from numba.core.compiler import Compiler

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

#: What a helper compiles besides its own code, to be callable from Python: a CPython wrapper
#: (unboxing every argument, boxing the result) and a C-callable wrapper. Helpers that take
#: the kernels' tuples of ~30-80 arrays, or ~50 arrays, are never called from Python, and their
#: wrappers were a quarter of a kernel's compile (segmented: 19 s of CPU with them, 15 s
#: without): :data:`jit_inner` and :data:`jit_block_inner` leave them out. Helpers the tests
#: call directly keep them.
NO_WRAPPERS = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}

#: :data:`jit_voxel` without the Python-facing wrappers (callable from compiled code only).
jit_inner = njit(fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True, **NO_WRAPPERS)


def jit_parallel(func):
    """Compile a voxel-loop kernel with ``parallel=True`` (``prange``) and an on-disk cache."""
    return njit(
        parallel=True, cache=True, fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True
    )(func)


class _NoAliasCompiler(Compiler):
    """numba's default pipeline with its internal ``noalias`` flag set.

    The flag marks every pointer argument of the compiled function ``noalias`` (numba sets it
    itself only for parfor bodies). Without it LLVM must assume that any two array arguments
    may overlap, and the block kernels' lane loops (``for l in range(L): a[l] += ...``) are
    not vectorised at all. It is not a public ``njit`` option (numba 0.59–0.68 keep it in
    ``numba.core.compiler.Flags``), hence this pipeline and the numba pin in setup.cfg.
    """

    def __init__(self, typingctx, targetctx, library, args, return_type, flags, locals):
        flags.noalias = True
        super().__init__(typingctx, targetctx, library, args, return_type, flags, locals)


#: Block helpers: like :data:`jit_voxel`, and every array argument promised not to overlap any
#: other. A caller must never pass the same array (or two views of one buffer) twice.
jit_block = njit(fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True,
                 pipeline_class=_NoAliasCompiler)

#: :data:`jit_block` without the Python-facing wrappers (see :data:`NO_WRAPPERS`).
jit_block_inner = njit(fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True,
                       pipeline_class=_NoAliasCompiler, **NO_WRAPPERS)
