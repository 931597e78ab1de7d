"""Compilation options and pipelines shared by every kernel, in one place.

Turning ``fastmath`` fully on would include the ``nnan``/``ninf`` flags, which let LLVM assume
no NaN or inf ever occurs: then ``np.isfinite`` checks that keep bad voxels from poisoning
results can be folded away. We keep only flags that cannot change results between runs.

Two decorators make code: :func:`jit_parallel` / :func:`jit_serial` for the cached kernels that
Python calls, :data:`jit_voxel` / :data:`jit_block` for the helpers they call. A helper's code
exists only inside the kernels (see "One optimisation..." below); tests that call a helper from
Python get a twin compiled for that (:func:`python_callable`). This leans on numba internals
(code libraries, the ``noalias`` flag), hence the numba pin in setup.cfg.
"""

import contextlib

from numba import njit
from numba.core import config as numba_config
from numba.core.codegen import JITCodeLibrary
from numba.core.compiler import Compiler
from numba.core.compiler_lock import require_global_compiler_lock
from numba.core.registry import CPUDispatcher

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
# or six times, all of it but the last thrown away, since only the kernel's own library is ever
# run or cached (segmented's first compile: 20.5 s of CPU before, 10.9 s after). While a kernel
# compiles, every library created under it is "link-only": finalising it only links its
# callees' IR in; the kernel's library links everything and optimises it once. The result is
# the same code; what differs is how often LLVM rebuilds it.


class _LinkOnlyLibrary(JITCodeLibrary):
    """A code library that is never optimised as a module nor turned into machine code.

    Its IR (function-level optimised, as numba does for every function) is linked into the
    library that uses it. It has no symbol in the JIT engine, so it must never be called from
    Python: helpers are :class:`KernelHelper`, whose Python calls go to a twin.
    """

    def finalize(self):
        require_global_compiler_lock()
        self._raise_if_finalized()
        seen = set()
        for library in self._linking_libraries:
            if library not in seen:
                if hasattr(self, "_reload_init"):  # newer numba (its own finalize does this)
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


#: What a helper compiles besides its own code, to be callable from Python: a CPython wrapper
#: (unboxing every argument, boxing the result) and a C-callable wrapper. Kernel helpers leave
#: them out (they were a quarter of a kernel's compile: segmented, 19 s of CPU with them, 15 s
#: without); a call from Python goes to the helper's :func:`python_callable` twin instead.
NO_WRAPPERS = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}

#: The options every helper and kernel compiles with.
OPTIONS = {"fastmath": FASTMATH_FLAGS, "error_model": "numpy", "nogil": True}


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


class KernelHelper(CPUDispatcher):
    """A function that kernels call: compiled without Python wrappers, and link-only under a
    kernel's compile (its code exists only inside the kernels).

    Such an overload has no machine code of its own, so calling it from Python would jump to
    address 0; a Python call goes to :func:`python_callable` of the helper instead (tests do
    this), which compiles a twin with wrappers and machine code.
    """

    def __call__(self, *args, **kwargs):
        return python_callable(self)(*args, **kwargs)


def _helper_decorator(pipeline_class):
    def decorate(func):
        if numba_config.DISABLE_JIT:
            return func
        return KernelHelper(func, targetoptions=dict(nopython=True, **OPTIONS, **NO_WRAPPERS),
                            pipeline_class=pipeline_class)
    return decorate


#: Per-voxel helpers: compiled as part of the parallel kernel that calls them (and inlined there
#: by LLVM). Not cached on their own: the kernel's cache holds their code, and its stamp follows
#: their sources (see ``fastivim.kernels._drop_stale_cache``).
jit_voxel = _helper_decorator(Compiler)

#: Block helpers: like :data:`jit_voxel`, and every array argument promised not to overlap any
#: other. A caller must never pass the same array (or two views of one buffer) twice.
jit_block = _helper_decorator(_NoAliasCompiler)



def python_callable(helper):
    """A twin of a kernel helper that Python can call: the same function and options, with the
    Python wrappers and machine code of its own (for tests and ``inspect_asm``). Compiled on
    first use, once per helper; a plain function (``NUMBA_DISABLE_JIT=1``) is returned as is."""
    if not isinstance(helper, KernelHelper):
        return helper
    twin = helper.__dict__.get("_twin")
    if twin is None:
        options = {k: v for k, v in helper.targetoptions.items()
                   if k not in NO_WRAPPERS and k != "nopython"}
        twin = njit(pipeline_class=helper._compiler.pipeline_class, **options)(helper.py_func)
        helper.__dict__["_twin"] = twin
    return twin


def jit_parallel(func):
    """Compile a voxel-loop kernel with ``parallel=True`` (``prange``) and an on-disk cache,
    optimising its code once (see :class:`_KernelCompiler`)."""
    return njit(parallel=True, cache=True, pipeline_class=_KernelCompiler, **OPTIONS)(func)


def jit_serial(func):
    """A cached kernel that runs on the calling thread (no ``prange`` inside), optimised once
    like :func:`jit_parallel`."""
    return njit(cache=True, pipeline_class=_KernelCompiler, **OPTIONS)(func)
