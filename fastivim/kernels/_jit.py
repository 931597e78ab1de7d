"""Compilation options shared by every kernel, in one place.

Turning ``fastmath`` fully on would include the ``nnan``/``ninf`` flags, which let LLVM assume
no NaN or inf ever occurs: then ``np.isfinite`` checks that keep bad voxels from poisoning
results can be folded away. We keep only flags that cannot change results between runs.
"""

import contextlib

from numba import njit
from numba.core.codegen import JITCodeLibrary
from numba.core.compiler import Compiler
from numba.core.compiler_lock import require_global_compiler_lock

#: Explicit fast-math flags: no ``nnan``/``ninf`` (NaN checks must stay true), no ``afn``
#: (approximate exp would cost accuracy near machine precision in noise-free fits), and no
#: ``reassoc``: it let LLVM order sums by the runtime alignment of scratch arrays, so the same
#: voxel could give different bits from one call to the next (and a tie between starts could
#: flip), for no measurable speed (tests/test_compile.py guards this).
FASTMATH_FLAGS = {"nsz", "arcp", "contract"}

# --- One optimisation and one machine-code pass per cached kernel ------------------------------
#
# numba finalises every code library on its own: module-level O3 over the library and all it
# links in, then machine code. A cached kernel nests five or six libraries that each contain the
# whole fit (the chunk and block helpers, the parfor body, its gufunc wrapper, the parallel
# wrapper, the kernel itself), so the same code was optimised and turned into machine code five
# or six times: about two thirds of the segmented kernel's first compile (16 s of CPU), all of
# it thrown away, since only the kernel's own library is ever run or cached. While a kernel
# compiles, every library created under it is "link-only": finalising it only links its
# callees' IR in; the kernel's library links everything and optimises it once. The result is
# the same code; what differs is how often LLVM rebuilds it.


class _LinkOnlyLibrary(JITCodeLibrary):
    """A code library that is never optimised as a module nor turned into machine code.

    Its IR (function-level optimised, as numba does for every function) is linked into the
    library that uses it. It has no symbol in the JIT engine: it must never be called from
    Python (see :class:`_KernelCompiler`, which gives helpers callable from Python a normal
    library).
    """

    def finalize(self):
        require_global_compiler_lock()
        self._raise_if_finalized()
        seen = set()
        for library in self._linking_libraries:
            if library not in seen:
                self._reload_init.update(library._reload_init)
                seen.add(library)
                self._final_module.link_in(library._get_module_for_linking(), preserve=True)
        self._finalize_dynamic_globals()
        self._finalized = True

    def get_pointer_to_function(self, name):
        return 0  # not in the engine: as for a function compiled without a Python wrapper

    @property
    def codegen(self):
        return _NoEnvCodegen(self._codegen)


class _NoEnvCodegen:
    """The codegen, except that a link-only library's environment pointer is not installed: the
    library has no global in the engine to hold it (the same as any helper of a kernel loaded
    from numba's cache, whose environments are never installed either)."""

    def __init__(self, codegen):
        self._codegen = codegen

    def set_env(self, env_name, env):
        pass

    def __getattr__(self, name):
        return getattr(self._codegen, name)


_LINK_ONLY = {"on": False}


#: Libraries numba creates for itself whose machine code is called directly (its runtime's
#: atomics, a 128-bit multiply helper): never link-only, whenever they happen to be created.
_KEEP_NORMAL = frozenset({"nrt", "multi3"})


@contextlib.contextmanager
def _link_only_libraries(codegen):
    """Within: every library ``codegen`` creates is a :class:`_LinkOnlyLibrary`, except numba's
    own (:data:`_KEEP_NORMAL`), one loaded from a cache, and one a pipeline creates itself (see
    :func:`_normal_library`). Compiles hold numba's global compiler lock, so no other compile
    sees the switch; a nested kernel compile leaves it as it is."""
    require_global_compiler_lock()
    if _LINK_ONLY["on"]:
        yield
        return
    normal = codegen.create_library
    unserialize = codegen.unserialize_library

    def create_library(name, **kwargs):
        if name in _KEEP_NORMAL:
            return normal(name, **kwargs)
        return _LinkOnlyLibrary(codegen, name, **kwargs)

    def unserialize_library(serialized):
        del codegen.create_library  # a cached library is loaded as numba loads it
        try:
            return unserialize(serialized)
        finally:
            codegen.create_library = create_library

    codegen.create_library = create_library
    codegen.unserialize_library = unserialize_library
    _LINK_ONLY["on"] = True
    try:
        yield
    finally:
        _LINK_ONLY["on"] = False
        del codegen.create_library, codegen.unserialize_library


def _normal_library(state, func):
    codegen = state.targetctx.codegen()
    library = type(codegen)._library_class(codegen, func.__qualname__)
    library.enable_object_caching()
    return library


class _KernelCompiler(Compiler):
    """numba's pipeline for a cached kernel: its own library is a normal one; every library
    created while it compiles (helpers, parfor bodies, wrappers) is link-only."""

    def compile_extra(self, func):
        self.state.library = _normal_library(self.state, func)
        with _link_only_libraries(self.state.targetctx.codegen()):
            return super().compile_extra(func)


def _with_own_library(base):
    """``base`` pipeline, keeping a normal library for a helper that Python calls too (tests
    call some block helpers directly: their overload must have machine code)."""

    class _WithOwnLibrary(base):
        def compile_extra(self, func):
            self.state.library = _normal_library(self.state, func)
            return super().compile_extra(func)

    return _WithOwnLibrary


#: Per-voxel helpers: compiled as part of the parallel kernel that calls them (and inlined there
#: by LLVM). Not cached on their own: the kernel's cache holds their code, and its stamp follows
#: their sources (see ``fastivim.kernels._drop_stale_cache``). Tests call some of them from
#: Python, so each keeps a library of its own with machine code (:func:`_with_own_library`).
jit_voxel = njit(fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True,
                 pipeline_class=_with_own_library(Compiler))

#: What a helper compiles besides its own code, to be callable from Python: a CPython wrapper
#: (unboxing every argument, boxing the result) and a C-callable wrapper. Helpers that take
#: the kernels' tuples of ~30-80 arrays, or ~50 arrays, are never called from Python, and their
#: wrappers were a quarter of a kernel's compile (segmented: 19 s of CPU with them, 15 s
#: without): :data:`jit_inner` and :data:`jit_block_inner` leave them out. Helpers the tests
#: call directly keep them.
NO_WRAPPERS = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}

#: :data:`jit_voxel` without the Python-facing wrappers (callable from compiled code only; under a
#: kernel's compile its library is link-only).
jit_inner = njit(fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True, **NO_WRAPPERS)


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
                 pipeline_class=_with_own_library(_NoAliasCompiler))

#: :data:`jit_block` without the Python-facing wrappers (see :data:`NO_WRAPPERS`).
jit_block_inner = njit(fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True,
                       pipeline_class=_NoAliasCompiler, **NO_WRAPPERS)


def jit_parallel(func):
    """Compile a voxel-loop kernel with ``parallel=True`` (``prange``) and an on-disk cache,
    optimising its code once (see :class:`_KernelCompiler`)."""
    return njit(
        parallel=True, cache=True, fastmath=FASTMATH_FLAGS, error_model="numpy", nogil=True,
        pipeline_class=_KernelCompiler,
    )(func)
