"""Compiled numba kernels: arrays and scalars in, arrays out; no Python objects, no I/O."""

import hashlib
from pathlib import Path

#: Name of the file, beside numba's cache of ``driver.fit_volume``, that records which kernel
#: sources that cache was built from.
DIGEST_FILE = "fastivim-kernel-sources.sha256"


def sources_digest() -> str:
    """SHA-256 over every module of this package (name and content)."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _drop_stale_cache():
    """Flush numba's cache of ``fit_volume`` when any kernel module changed since it was built.

    numba stamps a cached function with the hash of its *own* file only, yet the cached
    ``driver.fit_volume`` embeds the helpers it calls from ``voxel.py``, ``full.py``, etc.
    (compiled uncached, as part of it): after editing a helper, the stale machine code would be
    loaded. A digest of all kernel sources is kept beside the cache; when it differs, the cache
    index is emptied so numba recompiles. Only cache files are touched, never sources; a
    read-only install (whose sources cannot change) is left alone.
    """
    from . import driver

    cache = getattr(driver.fit_volume, "_cache", None)
    path = getattr(cache, "cache_path", None)
    if not path:
        return
    stamp = Path(path) / DIGEST_FILE
    digest = sources_digest()
    try:
        if stamp.is_file() and stamp.read_text().strip() == digest:
            return
        cache.flush()
        Path(path).mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(f".{stamp.name}.{id(stamp)}.partial")
        tmp.write_text(digest + "\n")
        tmp.replace(stamp)  # atomic: concurrent importers see the old or the new digest
    except OSError:
        pass


_drop_stale_cache()
