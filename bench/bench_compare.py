"""Warm kernel speed of this checkout against another (e.g. main before a change), same run.

    git archive main | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    .venv/bin/python bench/bench_compare.py --base /tmp/base            # segmented and full
    .venv/bin/python bench/bench_compare.py --base /tmp/base --dtype float64 --rounds 5

Each measurement is a fresh process importing fastivim from one checkout (``PYTHONPATH``), with
its own warm numba cache (compiled once beforehand, outside the timings). The two checkouts
alternate, round after round, so both see the same load on a shared machine. Per process: the
best of a few ``fit_voxels`` calls on a phantom matrix (float32 by default), as voxels per wall
second and per CPU second (all threads), and the peak resident memory of the fit beyond the
memory before it (``VmHWM`` after resetting it, Linux). Ratios are this checkout over the base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import numpy as np, numba
import fastivim
numba.set_num_threads({threads})
ph = fastivim.simulate.phantom(({n},), snr=30, seed=0)
Y = np.ascontiguousarray(ph.signal, dtype=np.{dtype})
b = ph.b_values
fastivim.fit_voxels(Y[:3000], b, method={method!r})     # load the cache, touch the code
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = vm("VmRSS")
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
except OSError:
    pass
best_wall = best_cpu = float("inf")
for _ in range({repeats}):
    w0, c0 = time.perf_counter(), time.process_time()
    fastivim.fit_voxels(Y, b, method={method!r})
    best_wall = min(best_wall, time.perf_counter() - w0)
    best_cpu = min(best_cpu, time.process_time() - c0)
print(json.dumps({{"wall": best_wall, "cpu": best_cpu, "peak_extra": vm("VmHWM") - before,
                   "input": Y.nbytes}}))
"""


def child(src, cache, method, dtype, n, threads, repeats):
    env = dict(os.environ, PYTHONPATH=str(src), NUMBA_CACHE_DIR=str(cache))
    code = CHILD.format(threads=threads, n=n, dtype=dtype, method=method, repeats=repeats)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the other checkout's root folder")
    p.add_argument("--methods", default="segmented,full")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n", type=int, default=200_000, help="voxels per fit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="fits per process (best counts)")
    p.add_argument("--cache", default=None,
                   help="keep the two numba caches under this folder (default: temporary)")
    a = p.parse_args()
    sources = {"base": Path(a.base).resolve(), "this": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        caches = {k: Path(a.cache or tmp) / k for k in sources}
        rows = {}
        for m in a.methods.split(","):
            for k in sources:  # compile (or load) once, outside the timings
                child(sources[k], caches[k], m, a.dtype, 3000, a.threads, 1)
            res = {k: [] for k in sources}
            for _ in range(a.rounds):
                for k in sources:
                    res[k].append(child(sources[k], caches[k], m, a.dtype, a.n, a.threads,
                                        a.repeats))
            rows[m] = res
    print(f"warm fit_voxels, {a.n:,} voxels {a.dtype}, {a.threads} threads, {a.rounds} "
          f"alternating rounds (median); base = {sources['base']}")
    print(f"{'method':<11}{'base vox/s':>12}{'this vox/s':>12}{'ratio':>7}"
          f"{'base vox/CPU-s':>16}{'this vox/CPU-s':>16}{'ratio':>7}"
          f"{'peak MB base':>14}{'peak MB this':>14}")
    for m, res in rows.items():
        med = {k: {q: statistics.median(r[q] for r in v) for q in ("wall", "cpu", "peak_extra")}
               for k, v in res.items()}
        vw = {k: a.n / med[k]["wall"] for k in med}
        vc = {k: a.n / med[k]["cpu"] for k in med}
        print(f"{m:<11}{vw['base']:>12,.0f}{vw['this']:>12,.0f}{vw['this'] / vw['base']:>7.3f}"
              f"{vc['base']:>16,.0f}{vc['this']:>16,.0f}{vc['this'] / vc['base']:>7.3f}"
              f"{med['base']['peak_extra'] / 1e6:>14.1f}{med['this']['peak_extra'] / 1e6:>14.1f}")
    print(f"input matrix: {res['this'][0]['input'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
