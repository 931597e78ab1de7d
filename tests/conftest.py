"""Shared test configuration.

* ``tests/`` goes on ``sys.path`` so that test modules can ``import reference`` and
  ``import strategies`` under any pytest import mode.
* Hypothesis profiles: ``deadline=None`` everywhere (the first call of a kernel compiles or
  loads the numba cache, which takes seconds).
* :data:`NO_JIT` is true under ``NUMBA_DISABLE_JIT=1`` (``make test-nojit``): tests scale their
  voxel counts with :func:`scaled` so that pure-Python kernels stay quick.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

settings.register_profile(
    "fastivim",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
# a longer search for local bug hunting: HYPOTHESIS_PROFILE=thorough pytest ...
settings.register_profile("thorough", parent=settings.get_profile("fastivim"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastivim"))
