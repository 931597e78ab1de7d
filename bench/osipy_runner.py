"""Fit saved phantoms with osipy's ``fit_ivim`` (run by bench_peers.py in osipy's own venv).

osipy needs Python >= 3.12, so ``bench/bench_peers.py`` saves its phantoms to an ``.npz`` and
runs this script with the osipy environment's interpreter::

    .venv-osipy/bin/python bench/osipy_runner.py IN.npz OUT.npz

``IN.npz`` holds ``names`` (str array) and for each name ``<name>__Y`` (n_vox, n_b) and
``<name>__b`` (n_b,). ``OUT.npz`` gets ``<name>__<method>__{D,D_star,f,S0,qmask}`` and a JSON
string ``timing`` with the fit seconds per (name, method) and the import time. Only NumPy and
osipy are used here (no fastivim).
"""

import json
import logging
import sys
import time

t0 = time.perf_counter()
import numpy as np  # noqa: E402
import osipy  # noqa: E402
from osipy.ivim import fit_ivim  # noqa: E402
from osipy.ivim.fitting.estimators import FittingMethod  # noqa: E402

IMPORT_S = time.perf_counter() - t0
logging.disable(logging.WARNING)


def main(src, dst):
    data = np.load(src)
    out = {}
    timing = {"import_s": IMPORT_S, "osipy": getattr(osipy, "__version__", "?"), "fits": {}}
    # warm-up: first call pays lazy imports and registry set-up
    first = str(data["names"][0])
    t = time.perf_counter()
    fit_ivim(np.ascontiguousarray(data[first + "__Y"][:50], dtype=np.float64),
             data[first + "__b"], method=FittingMethod("segmented"))
    timing["first_call_s"] = time.perf_counter() - t
    for name in data["names"]:
        name = str(name)
        Y = np.ascontiguousarray(data[name + "__Y"], dtype=np.float64)
        b = np.asarray(data[name + "__b"], dtype=np.float64)
        for method in ("segmented", "full"):
            t = time.perf_counter()
            r = fit_ivim(Y, b, method=FittingMethod(method))
            timing["fits"][f"{name}__{method}"] = time.perf_counter() - t
            key = f"{name}__{method}__"
            out[key + "D"] = np.asarray(r.d_map.values, dtype=np.float64).ravel()
            out[key + "D_star"] = np.asarray(r.d_star_map.values, dtype=np.float64).ravel()
            out[key + "f"] = np.asarray(r.f_map.values, dtype=np.float64).ravel()
            out[key + "S0"] = np.asarray(r.s0_map.values, dtype=np.float64).ravel()
            out[key + "qmask"] = np.asarray(r.quality_mask, dtype=bool).ravel()
    out["timing"] = np.array(json.dumps(timing))
    np.savez(dst, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
