"""Small shared constants and CLI checks for the tests (no fitting code: see ``reference.py``)."""

from __future__ import annotations

from pathlib import Path

import numba
from click.testing import CliRunner

from fastivim.cli import main

#: True under ``NUMBA_DISABLE_JIT=1`` (``make test-nojit``): kernels run as plain Python.
NO_JIT = bool(numba.config.DISABLE_JIT)

#: OSIPI TF2.4 test vectors, vendored with their licence and provenance (see PROVENANCE.md).
OSIPI_DIR = Path(__file__).resolve().parent / "data" / "osipi"


def scaled(n_jit: int, n_nojit: int) -> int:
    """A voxel count: ``n_jit`` with compiled kernels, ``n_nojit`` when the JIT is off."""
    return n_nojit if NO_JIT else n_jit


def invoke(*args):
    """``fastivim *args`` through Click's runner (exceptions propagate)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_refused(r, *words, code=1):
    """One short ``Error:`` line naming ``words``, the exit code, no traceback or raw warning."""
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    assert lines[0].startswith("Error:"), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert "unexpected" not in lines[0] and "Traceback" not in r.output
    assert len(lines[0]) < 400, lines[0]
