"""Compiled numba kernels: arrays and scalars in, arrays out; no Python objects, no I/O."""

import hashlib
import re
from pathlib import Path

_DIGEST_LINE = re.compile(r'^KERNEL_SOURCES_DIGEST = "([0-9a-f]*)"$', re.M)


def _sync_source_digest():
    """Keep ``driver.KERNEL_SOURCES_DIGEST`` equal to the hash of the helper modules.

    numba stamps a cached function with the hash of its *own* file only, yet the cached
    ``driver.fit_volume`` embeds the helpers it calls from ``voxel.py``, ``full.py``, etc.
    (which are compiled uncached, as part of it). Writing their digest into ``driver.py``
    makes any helper edit change ``driver.py`` too, so numba recompiles instead of loading
    stale machine code. Best effort: a read-only install never changes, so nothing is needed.
    """
    here = Path(__file__).parent
    h = hashlib.sha256()
    for p in sorted(here.glob("*.py")):
        if p.name not in ("driver.py", "__init__.py"):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    digest = h.hexdigest()[:16]
    driver = here / "driver.py"
    try:
        text = driver.read_text()
        match = _DIGEST_LINE.search(text)
        if match and match.group(1) != digest:
            driver.write_text(_DIGEST_LINE.sub(f'KERNEL_SOURCES_DIGEST = "{digest}"', text))
    except OSError:
        pass


_sync_source_digest()
