"""Compiling the kernels: once per machine, said each time it happens, or ahead of time.

numba compiles each kernel the first time it is called with a new cache folder (a new machine,
virtual environment, container or cluster worker) and keeps the machine code on disk
(``NUMBA_CACHE_DIR``, by default ``__pycache__`` beside the kernel sources); later processes
load it in well under a second. Each method has its own kernel, so a run compiles only what it
uses.

Whenever one of fastivim's cached kernels actually compiles (a cache load is silent), the
logger ``fastivim.compile`` says so at INFO level, at the start (what, that it happens once,
and how long the last compile of it took on this machine, from :data:`TIMES_FILE` beside the
cache) and at the end (the measured seconds). A process that configured no logging at all gets
the same two lines as :class:`CompileWarning` instead, so that a notebook or script that never
set up logging still sees why the first call is slow. ``fastivim run`` prints them as notes.

:func:`compile_kernels` (``fastivim compile``) compiles ahead of time, e.g. while building a
container image or in a CI job's set-up, so that no run pays for it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path

#: The logger that reports compiles.
LOGGER = logging.getLogger("fastivim.compile")

#: File beside numba's cache of a kernel: ``{kernel: seconds of its last compile}``.
TIMES_FILE = "fastivim-compile-times.json"

#: What each compiled kernel is, for the user (by ``module.function``).
DESCRIPTIONS = {
    "fastivim.kernels.block.fit_segmented_blocks": "the segmented method's fitting kernel",
    "fastivim.kernels.block.fit_full_blocks": "the full method's fitting kernel",
    "fastivim.kernels.driver.fit_volume": "the scalar reference kernel",
    "fastivim.kernels.output.split_columns": "the output kernel",
    "fastivim.kernels.uncertainty.ls_uncertainty": "the uncertainty kernel",
    "fastivim.kernels.simplified.fit_simplified_volume": "the simplified model's kernel",
    "fastivim.kernels.bayes.em_likelihoods": "the Bayesian method's likelihood kernel",
    "fastivim.kernels.bayes.em_iterations": "the Bayesian method's EM kernel",
    "fastivim.kernels.bayes.compact_columns": "the Bayesian method's pruning kernel",
    "fastivim.kernels.bayes.posterior_volume": "the Bayesian method's posterior kernel",
    "fastivim.kernels.spatial.weighted_means": "the spatial method's signal-summary kernel",
    "fastivim.kernels.spatial.spatial_posterior": "the spatial method's pooled-posterior kernel",
}

#: What :func:`compile_kernels` can compile: the four methods and two options.
TARGETS = ("segmented", "full", "bayesian", "spatial", "uncertainty", "simplified")

#: Targets whose fit runs the ``full`` kernel first (the Bayesian noise estimate). When that
#: kernel is not compiled yet and the process may use two CPUs or more, it compiles in a second
#: process while this one compiles the target's own kernels: the wait is the longer of the two
#: instead of their sum (numba compiles one function at a time per process).
NEEDS_FULL = ("bayesian", "spatial")

#: Seconds to wait for that second process before compiling here instead.
SECOND_PROCESS_TIMEOUT = 900


class CompileWarning(UserWarning):
    """A fastivim kernel is being compiled (or has just been); only issued when the process
    has configured no logging (else the ``fastivim.compile`` logger says it)."""


def kernel_key(dispatcher) -> str:
    """``module.function`` of a numba dispatcher."""
    f = dispatcher.py_func
    return f"{f.__module__}.{f.__qualname__}"


def _times_path(dispatcher) -> Path | None:
    path = getattr(getattr(dispatcher, "_cache", None), "cache_path", None)
    return Path(path) / TIMES_FILE if path else None


def last_compile_seconds(dispatcher) -> float | None:
    """Seconds the last compile of ``dispatcher`` took here (from :data:`TIMES_FILE`), or None."""
    path = _times_path(dispatcher)
    try:
        value = json.loads(path.read_text()).get(kernel_key(dispatcher))
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def _record_seconds(dispatcher, seconds: float) -> None:
    """Store the measured compile time beside the cache (best effort: a read-only cache or a
    concurrent writer only loses the figure)."""
    path = _times_path(dispatcher)
    if path is None:
        return
    try:
        try:
            times = json.loads(path.read_text())
        except (OSError, ValueError):
            times = {}
        times[kernel_key(dispatcher)] = round(seconds, 2)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        tmp.write_text(json.dumps(times, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
    except OSError:
        pass


def _say(message: str) -> None:
    if LOGGER.hasHandlers():
        LOGGER.info(message)
    else:
        warnings.warn(message, CompileWarning, stacklevel=2)


def start_message(dispatcher) -> str:
    what = DESCRIPTIONS.get(kernel_key(dispatcher), kernel_key(dispatcher))
    where = getattr(getattr(dispatcher, "_cache", None), "cache_path", None)
    last = last_compile_seconds(dispatcher)
    text = (f"compiling {what} for this machine, once: later runs load it from numba's cache"
            + (f" ({where})" if where else ""))
    if last is not None:
        text += f"; its last compile here took {last:.1f} s"
    return text


def _watcher_class():
    """:class:`_Watcher` as a ``numba.core.event.Listener`` (numba imported only when used)."""
    from numba.core import event

    return type("CompileWatcher", (_Watcher, event.Listener), {})


class _Watcher:
    """numba ``numba:compile`` listener: reports the outermost compile of a watched kernel.

    numba raises the event only when it really compiles (not on a cache load); helpers compiled
    as part of a kernel raise nested events, which are counted but not reported.
    """

    def __init__(self, dispatchers):
        self.watched = {id(d) for d in dispatchers}
        self.local = threading.local()

    def on_start(self, event):
        depth = getattr(self.local, "depth", 0)
        self.local.depth = depth + 1
        d = event.data.get("dispatcher")
        if depth == 0 and id(d) in self.watched:
            self.local.started = time.perf_counter()
            _say(start_message(d))

    def on_end(self, event):
        self.local.depth = getattr(self.local, "depth", 1) - 1
        d = event.data.get("dispatcher")
        if self.local.depth == 0 and id(d) in self.watched:
            seconds = time.perf_counter() - getattr(self.local, "started", time.perf_counter())
            # numba's Event.is_failed is inverted (0.59-0.68): read the exception itself
            if getattr(event, "_exc_details", None) is not None:
                return
            _record_seconds(d, seconds)
            what = DESCRIPTIONS.get(kernel_key(d), kernel_key(d))
            _say(f"compiled {what} in {seconds:.1f} s (kept in the cache for later runs)")


_installed = False
_lock = threading.Lock()


def watch_compiles() -> None:
    """Start reporting compiles of fastivim's cached kernels (once per process)."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        from numba.core import event

        from .kernels import cached_kernels

        event.register("numba:compile", _watcher_class()(cached_kernels()))
        _installed = True


class NoteHandler(logging.Handler):
    """Sends ``fastivim.compile`` records to a ``note(message)`` callable (the CLI's notes)."""

    def __init__(self, note):
        super().__init__(logging.INFO)
        self.note = note

    def emit(self, record):
        self.note(record.getMessage())


class compile_notes:
    """Context manager: while it is open, compile reports go to ``note`` (None: nowhere, and
    no :class:`CompileWarning` either)."""

    def __init__(self, note):
        self.handler = NoteHandler(note) if note is not None else logging.NullHandler()
        self.level = None

    def __enter__(self):
        self.level = LOGGER.level
        if LOGGER.getEffectiveLevel() > logging.INFO:
            LOGGER.setLevel(logging.INFO)
        LOGGER.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        LOGGER.removeHandler(self.handler)
        LOGGER.setLevel(self.level)
        return False


#: Signal-to-noise ratio of the probe phantom.
PROBE_SNR = 30.0


def _probe():
    """A small phantom whose fits run every code path of every kernel (the Bayesian fit needs
    enough usable voxels to learn a prior)."""
    from .simulate import phantom

    return phantom((400,), snr=PROBE_SNR, seed=0)


def targets_for(method: str, model: str = "ivim", uncertainty: bool = False) -> tuple:
    """The :data:`TARGETS` a fit with these options needs."""
    if model == "simplified":
        return ("simplified",)
    return (method,) + (("uncertainty",) if uncertainty and method not in ("bayesian", "spatial")
                        else ())


def compile_kernels(targets=TARGETS) -> dict:
    """Compile (or load from the cache) the kernels of ``targets``; return seconds per target.

    Each target is one small fit (:func:`_probe`): ``"segmented"``, ``"full"``, ``"bayesian"``
    (the method), ``"uncertainty"`` (the least-squares SD maps, both methods) and
    ``"simplified"`` (the simplified model). Each compiles what that target alone needs
    (``"uncertainty"`` does not compile a method's kernel). Compiles are reported as described
    in this module's docstring. Use it where a machine is set up (image build, CI, a cluster
    worker's start), with the same ``NUMBA_CACHE_DIR`` as the runs that follow.

    When the ``full`` kernel is needed (the ``full`` target among others, or ``bayesian`` and
    ``spatial``, whose noise estimate is a ``full`` fit) and not compiled yet, it compiles in a
    second process while this one compiles the rest (:class:`_FullElsewhere`), with two CPUs
    or more: numba compiles one function at a time per process.

    Raises
    ------
    ValueError
        An unknown target.
    """
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ValueError(f"unknown compile target(s) {', '.join(bad)}; valid: "
                         f"{', '.join(TARGETS)}")
    ph = _probe()
    seconds = {}
    watch_compiles()  # kernels run directly below (not through a fit) report too
    full = _FullElsewhere()
    needs_full = [t for t in targets if t in NEEDS_FULL]
    if needs_full or ("full" in targets and len(targets) > 1):
        full.start(beside="the Bayesian method's kernels" if needs_full else "the others")
    try:
        order = [t for t in targets if not (t == "full" and full.child is not None)]
        if len(order) < len(targets):
            order.append("full")  # compiling elsewhere: wait for it last
        for target in order:
            seconds[target] = _compile_target(target, ph, full)
    finally:
        full.stop()
    if "full" in seconds and full.seconds is not None:
        seconds["full"] = full.seconds  # ready when the second process was done
    return {t: seconds[t] for t in targets}


def _compile_target(target, ph, full) -> float:
    """Compile (or load) one target's kernels with a probe fit; seconds it took."""
    import numpy as np

    from .fit import fit_voxels

    t0 = time.perf_counter()
    if target in NEEDS_FULL and full.child is not None:
        _bayes_kernels(ph)  # here, while full compiles in the second process
    if target == "full" or target in NEEDS_FULL:
        full.wait()
    if target == "uncertainty":
        # one kernel serves both least-squares methods: run it alone, on made-up estimates
        # (a fit here would compile a method's kernel the caller may not use)
        from .kernels.tables import METHOD_SEGMENTED
        from .methods.least_squares import OUTPUT_COLUMNS, ls_uncertainty

        est = np.tile(np.float32([1000.0, 0.1, 0.02, 1e-3, 0.9, 1.0]),
                      (ph.signal.shape[0], 1))
        assert est.shape[1] == len(OUTPUT_COLUMNS)
        ls_uncertainty(ph.signal, METHOD_SEGMENTED, ph.b_values, 200.0, est)
    elif target == "simplified":
        fit_voxels(ph.signal, ph.b_values, method="segmented", model="simplified",
                   uncertainty=True)
    elif target == "spatial":
        from .fit import fit_ivim

        # the spatial method needs a volume: the probe's 400 voxels as a 20 x 20 slice
        fit_ivim(ph.signal.reshape(20, 20, -1), ph.b_values, method="spatial", adc=False)
    else:
        fit_voxels(ph.signal, ph.b_values, method=target)
    return time.perf_counter() - t0


def is_compiled(dispatcher) -> bool:
    """True when ``dispatcher`` has machine code here: compiled in this process, or in numba's
    cache for this machine's CPU (any signature: each kernel has one)."""
    if dispatcher.overloads:
        return True
    try:
        index = dispatcher._cache._cache_file._load_index()
        magic = dispatcher.targetctx.codegen().magic_tuple()
    except Exception:  # no cache (read-only install, numba internals changed): say no
        return False
    return any(key[1] == magic for key in index)


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def start_compile_process(target: str):
    """Start ``compile_kernels((target,))`` in a child process of the same Python, importing
    this very fastivim, with the same numba cache; return its ``Popen``, or None when it could
    not start. Its notes are discarded: the caller reports it."""
    import subprocess
    import sys

    import numba

    root = str(Path(__file__).resolve().parents[1])  # the folder holding this fastivim
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]]
                                                  if env.get("PYTHONPATH") else []))
    if numba.config.CACHE_DIR:
        env["NUMBA_CACHE_DIR"] = str(numba.config.CACHE_DIR)
    code = f"from fastivim.compiling import compile_kernels; compile_kernels(({target!r},))"
    try:
        return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=root,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    except OSError:
        return None


class _FullElsewhere:
    """The ``full`` kernel compiling in a second process, while this one compiles others.

    :meth:`start` starts it only when that kernel is not compiled yet and two CPUs are usable;
    :meth:`wait` waits for it (then this process loads the kernel from the cache). Any failure
    of the second process only means that ``full`` compiles here when first used, as without
    it; an interrupted wait stops the second process.
    """

    def __init__(self):
        self.child = None
        self.started = 0.0
        self.seconds = None  # how long the second process took, once it has compiled full

    def start(self, beside: str) -> None:
        from .kernels import ensure_fresh_cache
        from .kernels.block import fit_full_blocks

        ensure_fresh_cache()  # before the child looks at the cache
        if is_compiled(fit_full_blocks) or usable_cpus() < 2:
            return
        self.child = start_compile_process("full")
        if self.child is not None:
            self.started = time.perf_counter()
            _say(f"compiling {DESCRIPTIONS[kernel_key(fit_full_blocks)]} in a second process, "
                 f"beside {beside}")

    def wait(self) -> None:
        import subprocess

        from .kernels.block import fit_full_blocks

        child, self.child = self.child, None
        if child is None:
            return
        try:
            child.wait(timeout=SECOND_PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass  # full compiles here when first used
        finally:
            self.stop(child)
        if child.returncode == 0:
            self.seconds = time.perf_counter() - self.started
            _say(f"compiled {DESCRIPTIONS[kernel_key(fit_full_blocks)]} in "
                 f"{self.seconds:.1f} s in the second process (kept in the cache for later "
                 f"runs)")

    def stop(self, child=None) -> None:
        child = child or self.child
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()


def _bayes_kernels(ph) -> None:
    """Compile (or load) the Bayesian method's own kernels by running them on the probe, with
    the probe's true noise variance instead of a ``full`` fit's estimate."""
    from .fit import B_THRESHOLD
    from .methods import bayesian
    from .model import DEFAULT_BOUNDS
    from .simulate import S0_TISSUE

    sigma2 = (S0_TISSUE / PROBE_SNR) ** 2
    post = bayesian.prepare_posterior(ph.signal, ph.b_values, DEFAULT_BOUNDS, B_THRESHOLD, 0,
                                      sigma2=sigma2)
    out, sd, status = bayesian.empty_outputs(ph.signal.shape[0])
    bayesian.posteriors(ph.signal, post, out, sd, status)
