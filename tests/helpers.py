"""Small shared constants for the tests (no fitting code: see ``reference.py``)."""

from __future__ import annotations

from pathlib import Path

import numba

#: True under ``NUMBA_DISABLE_JIT=1`` (``make test-nojit``): kernels run as plain Python.
NO_JIT = bool(numba.config.DISABLE_JIT)

#: OSIPI TF2.4 test vectors, vendored with their licence and provenance (see PROVENANCE.md).
OSIPI_DIR = Path(__file__).resolve().parent / "data" / "osipi"


def scaled(n_jit: int, n_nojit: int) -> int:
    """A voxel count: ``n_jit`` with compiled kernels, ``n_nojit`` when the JIT is off."""
    return n_nojit if NO_JIT else n_jit
