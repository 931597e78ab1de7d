"""Import hygiene, checked once: what each entry point pulls in, and no import cycles.

Each case runs in a fresh interpreter, so modules imported by other tests do not hide a problem.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

#: (modules to import, modules that must not be imported as a consequence)
CASES = [
    # the API for pipelines: numpy and numba only
    (["fastivim"], ["nibabel", "click", "matplotlib", "tqdm", "dipy"]),
    # the front doors for other pipelines need none of the peers' code (issue 18)
    (["fastivim.interop", "fastivim.interop.dipy", "fastivim.interop.osipi",
      "fastivim.interop.osipy", "fastivim.interop.osipy.ivim"],
     ["dipy", "osipy", "nibabel", "click", "matplotlib"]),
    # library layers never import the command line or matplotlib
    (["fastivim.io", "fastivim.pipeline", "fastivim.batch"], ["click", "matplotlib"]),
    (["fastivim.options", "fastivim.config"], ["click", "nibabel", "matplotlib"]),
    # the command line and the report import matplotlib only when a figure is drawn
    (["fastivim.cli", "fastivim.report"], ["matplotlib"]),
]

#: Every module, imported first in its own interpreter: a cycle fails for some first module.
MODULES = ["fastivim.options", "fastivim.config", "fastivim.model", "fastivim.fit",
           "fastivim.io", "fastivim.io.read", "fastivim.io.write", "fastivim.io.layout",
           "fastivim.pipeline", "fastivim.batch", "fastivim.report", "fastivim.cli",
           "fastivim.cli.main", "fastivim.cli.run", "fastivim.cli.batch", "fastivim.cli.demo",
           "fastivim.interop", "fastivim.interop.dipy", "fastivim.interop.osipi",
           "fastivim.interop.osipy", "fastivim.interop.osipy.ivim"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("imports, forbidden", CASES, ids=lambda x: ",".join(x))
def test_imports_stay_light(imports, forbidden):
    code = (f"import sys\nimport {', '.join(imports)}\n"
            f"bad = [m for m in {forbidden!r} if m in sys.modules]\n"
            f"print(bad)\nsys.exit(1 if bad else 0)")
    proc = _run(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_import_cycle_whatever_module_comes_first():
    code = ("import importlib, subprocess, sys\n"
            f"for m in {MODULES!r}:\n"
            "    p = subprocess.run([sys.executable, '-c', f'import {m}'], capture_output=True,"
            " text=True)\n"
            "    assert p.returncode == 0, (m, p.stderr[-2000:])\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
