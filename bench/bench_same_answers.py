"""Same answers as another checkout: a method's results here against the base's, voxel by voxel.

    git archive main | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    .venv/bin/python bench/bench_same_answers.py --base /tmp/base             # full method
    .venv/bin/python bench/bench_same_answers.py --base /tmp/base --method segmented --n 5000

Each checkout fits the same phantoms in a fresh process (``PYTHONPATH``, its own numba cache):
Rician phantoms at SNR 10, 20, 30, 50, 100 and noise-free, noise-only voxels, a clinical scheme
with repeated b-values, and three random sets of bounds. Printed per phantom: whether the maps,
rmse and status are the same bits, the fraction of voxels whose sum of squares
(``rmse**2 * n_b``, from the kernel's float64 estimate) is within 1e-6 (relative) of the base's,
the worst relative difference, and the fraction with the same status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, numpy as np
import fastivim
from fastivim.model import ivim_signal
n, method, out = {n}, {method!r}, {out!r}
res = {{}}
def run(name, Y, b, bounds=None):
    r = fastivim.fit_voxels(Y, b, method=method, bounds=bounds)
    res[name + ":rmse"] = r.rmse
    res[name + ":status"] = r.status
    res[name + ":maps"] = np.stack([r.S0, r.f, r.D_star, r.D])
for snr in (10.0, 20.0, 30.0, 50.0, 100.0, None):
    ph = fastivim.simulate.phantom((n,), snr=snr, seed=123)
    run(f"SNR {{snr}}", ph.signal, ph.b_values)
rng = np.random.default_rng(5)
ph = fastivim.simulate.phantom((n,), snr=30.0, seed=7)
run("noise only", np.abs(rng.normal(0, 50, (n, ph.b_values.size))).astype(np.float32),
    ph.b_values)
b = np.array([0, 10, 20, 30, 50, 80, 100, 150, 200]
             + [x for x in (250, 400, 600, 800, 1000) for _ in range(3)], float)
S0 = rng.uniform(500, 1500, n)
clean = ivim_signal(b, S0, rng.uniform(0.02, 0.4, n), rng.uniform(10e-3, 80e-3, n),
                    rng.uniform(0.5e-3, 2e-3, n))
sigma = S0[:, None] / 30
run("clinical", np.hypot(clean + rng.normal(0, 1, clean.shape) * sigma,
                         rng.normal(0, 1, clean.shape) * sigma).astype(np.float32), b)
for i in range(3):
    r = np.random.default_rng(100 + i)
    bounds = {{"S0": (0.0, r.uniform(1500, 5000)), "f": (r.uniform(0, 0.05), r.uniform(0.3, 0.8)),
              "D_star": (r.uniform(2e-3, 6e-3), r.uniform(0.05, 0.3)),
              "D": (r.uniform(0, 3e-4), r.uniform(2.5e-3, 4e-3))}}
    run(f"bounds {{i}}", ph.signal, ph.b_values, bounds)
np.savez(out, **res)
"""


def fit_all(src: Path, tmp: Path, tag: str, method: str, n: int) -> dict:
    out = tmp / f"{tag}.npz"
    env = dict(os.environ, PYTHONPATH=str(src), NUMBA_CACHE_DIR=str(tmp / f"cache-{tag}"))
    subprocess.run([sys.executable, "-c", CHILD.format(n=n, method=method, out=str(out))],
                   env=env, check=True, cwd=tmp, stderr=subprocess.DEVNULL)
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the other checkout's root folder")
    p.add_argument("--method", default="full")
    p.add_argument("--n", type=int, default=20000, help="voxels per phantom")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = fit_all(Path(a.base).resolve(), Path(tmp), "base", a.method, a.n)
        this = fit_all(ROOT, Path(tmp), "this", a.method, a.n)
    print(f"{a.method} method, this checkout against {Path(a.base).resolve()}, {a.n:,} voxels "
          f"per phantom")
    print(f"{'phantom':<14}{'same bits':>10}{'SSR within 1e-6':>17}{'worst rel':>11}"
          f"{'same status':>13}")
    close_all, worst_all = [], 0.0
    for key in [k for k in base if k.endswith(":rmse")]:
        name = key[:-5]
        # the sum of squares is rmse**2 * n_b: n_b cancels in the relative difference
        s0, s1 = base[key].astype(float) ** 2, this[key].astype(float) ** 2
        with np.errstate(all="ignore"):
            rel = np.abs(s1 - s0) / np.abs(s0)
        rel = np.where(np.isnan(s0) & np.isnan(s1), 0.0, rel)
        rel = np.where(np.isnan(rel), np.inf, rel)
        same = all(np.array_equal(base[f"{name}:{q}"], this[f"{name}:{q}"], equal_nan=True)
                   for q in ("maps", "rmse", "status"))
        close_all.append(rel <= 1e-6)
        worst_all = max(worst_all, float(rel.max()))
        status = np.mean(base[name + ":status"] == this[name + ":status"])
        print(f"{name:<14}{'yes' if same else 'no':>10}{np.mean(rel <= 1e-6):>17.5f}"
              f"{rel.max():>11.2e}{status:>13.5f}")
    c = np.concatenate(close_all)
    print(f"{'all':<14}{'':>10}{c.mean():>17.5f}{worst_all:>11.2e}   ({c.size:,} voxels)")


if __name__ == "__main__":
    main()
