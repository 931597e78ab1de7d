"""First use of each method in one process, and the maps it gives, for comparing two checkouts
or two numba versions (e.g. a scratch venv with an older numba).

    python bench/bench_first_uses.py /tmp/a.npz                        # this checkout
    PYTHONPATH=/tmp/base python bench/bench_first_uses.py /tmp/b.npz   # another one
    python bench/bench_first_uses.py --compare /tmp/a.npz /tmp/b.npz   # same bits?

One process with an empty ``NUMBA_CACHE_DIR`` (a temporary folder) fits a 40×40×4 phantom
(SNR 25, float32) with segmented, full, bayesian, spatial, segmented with ``uncertainty`` and
the simplified model, in that order: each line is that call's wall and CPU seconds (the first
call of each compiles what it adds over the earlier ones). The maps (D, D_star, f, S0 and the
SDs) are saved to the ``.npz``; ``--compare`` says how many arrays are the same bits.
Run it from outside a checkout (``python -m``-style path rules: the script's folder, not the
working directory, comes first on ``sys.path``; ``PYTHONPATH`` picks the checkout).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

CASES = (("segmented", "segmented", {}), ("full", "full", {}), ("bayesian", "bayesian", {}),
         ("spatial", "spatial", {"voxel_sizes": (2.0, 2.0, 4.0)}),
         ("segmented_unc", "segmented", {"uncertainty": True}),
         ("simplified", "segmented", {"model": "simplified"}))
FIELDS = ("D", "D_star", "f", "S0", "D_sd", "f_sd", "D_star_sd")


def measure(path: str) -> None:
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastivim-first-uses-")
    import numpy as np

    import fastivim
    from fastivim.simulate import phantom

    ph = phantom((40, 40, 4), snr=25, seed=1)
    maps = {}
    print(f"fastivim from {os.path.dirname(fastivim.__file__)}, numba "
          f"{__import__('numba').__version__}, numpy {np.__version__}")
    print(f"{'case':<15}{'wall s':>8}{'CPU s':>8}")
    for name, method, kwargs in CASES:
        c0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        res = fastivim.fit_ivim(ph.signal, ph.b_values, mask=ph.mask, method=method, **kwargs)
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
        print(f"{name:<15}{time.perf_counter() - t0:8.1f}{cpu:8.1f}", flush=True)
        for field in FIELDS:
            value = getattr(res, field, None)
            if value is not None:
                maps[f"{name}_{field}"] = np.asarray(value)
    np.savez(path, **maps)


def compare(a: str, b: str) -> None:
    import numpy as np

    x, y = np.load(a), np.load(b)
    same = [k for k in x.files if k in y.files and np.array_equal(x[k], y[k], equal_nan=True)]
    for k in x.files:
        if k not in same:
            print(f"differs: {k}")
    print(f"{len(same)} of {len(x.files)} arrays are the same bits")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("npz", nargs="+")
    p.add_argument("--compare", action="store_true")
    a = p.parse_args()
    if a.compare:
        compare(*a.npz)
    else:
        measure(a.npz[0])
    sys.exit(0)
