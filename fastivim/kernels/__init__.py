"""Compiled numba kernels: arrays and scalars in, arrays out; no Python objects, no I/O.

Importing this package compiles, hashes and touches nothing: :func:`ensure_fresh_cache` runs
once, where a kernel is first about to be called (``fastivim.fit``).
"""

import hashlib
import threading
from pathlib import Path

#: Name of the file, beside numba's cache of the kernels, that records which kernel sources
#: that cache was built from.
DIGEST_FILE = "fastivim-kernel-sources.sha256"

_checked = False
_lock = threading.Lock()


def sources_digest() -> str:
    """SHA-256 over every module of this package (name and content)."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def cached_kernels():
    """Every dispatcher of this package that keeps an on-disk cache (``cache=True``).

    Found by scanning the package's modules, so that a new cached kernel is protected by
    :func:`_drop_stale_cache` without being listed anywhere.
    """
    import importlib
    import pkgutil

    from numba.core.dispatcher import Dispatcher

    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            path = getattr(getattr(obj, "_cache", None), "cache_path", None)
            if isinstance(obj, Dispatcher) and path and obj not in found:
                found.append(obj)
    return tuple(found)


def _drop_stale_cache(dispatchers):
    """Flush numba's cache of ``dispatchers`` when any kernel module changed since it was built.

    numba stamps a cached function with the hash of its *own* file only, yet a cached kernel
    such as ``driver.fit_volume`` embeds the helpers it calls from ``voxel.py``, ``full.py``,
    ``vmath.py``, etc. (compiled uncached, as part of it): after editing a helper, the stale
    machine code would be loaded. A digest of all kernel sources is kept beside the cache; when
    it differs, every listed kernel's cache index is emptied so numba recompiles. Only cache
    files are touched, never sources; a read-only install (whose sources cannot change) is
    left alone.
    """
    digest = None
    for dispatcher in dispatchers:
        cache = getattr(dispatcher, "_cache", None)
        path = getattr(cache, "cache_path", None)
        if not path:
            continue
        stamp = Path(path) / DIGEST_FILE
        digest = digest or sources_digest()
        try:
            if stamp.is_file() and stamp.read_text().strip() == digest:
                continue
            for d in dispatchers:  # kernels sharing this cache folder share the stamp
                c = getattr(d, "_cache", None)
                if getattr(c, "cache_path", None) == path:
                    c.flush()
            Path(path).mkdir(parents=True, exist_ok=True)
            tmp = stamp.with_name(f".{stamp.name}.{id(stamp)}.partial")
            tmp.write_text(digest + "\n")
            tmp.replace(stamp)  # atomic: concurrent processes see the old or the new digest
        except OSError:
            pass


def ensure_fresh_cache():
    """Run the stale-cache check of :func:`_drop_stale_cache` once per process (thread-safe)."""
    global _checked
    if _checked:
        return
    with _lock:
        if not _checked:
            _drop_stale_cache(cached_kernels())
            _checked = True
