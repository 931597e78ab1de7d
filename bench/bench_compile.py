"""What a new user waits for: the first run's compile, each later first use, and a warm start.

    .venv/bin/python bench/bench_compile.py                 # 128x128x30x10, every case
    .venv/bin/python bench/bench_compile.py --shape 64x64x10 --cases first,warm
    .venv/bin/python bench/bench_compile.py --src /tmp/base  # another checkout's sources

Every case is a fresh process (``python -m fastivim.cli run ...`` as a user types it, or a short
API script) with ``NUMBA_CACHE_DIR`` pointing at a temporary folder:

* ``first``: the first ``fastivim run`` of the image with the default method, empty cache;
* ``full``, ``bayesian``, ``spatial``, ``uncertainty``, ``simplified``: the first run with that
  method or option, starting from a copy of the cache the ``first`` run left (what it adds);
* ``float64``: ``fit_ivim(img.get_fdata(), b, mask=<the CLI's mask>)`` after the float32 run
  (``get_fdata()`` is float64: does it compile again?);
* ``warm``: the ``first`` command again on its own cache.

Printed per case: wall seconds of the process, its CPU seconds (user + system, from
``getrusage(RUSAGE_CHILDREN)``, which includes a second compile process the run starts and
waits for: the machine is shared, CPU time is the steadier figure), the
run record's ``load_kernel`` and ``fit`` seconds, and the wall added over the warm case.
``--src DIR`` puts DIR first on ``PYTHONPATH`` of every child, to measure another checkout
(e.g. ``git archive main | tar -x -C DIR``) with the same interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("first", "full", "bayesian", "spatial", "uncertainty", "simplified", "float64",
         "warm")

#: Extra ``fastivim run`` arguments of each CLI case.
RUN_ARGS = {"first": [], "full": ["--method", "full"], "bayesian": ["--method", "bayesian"],
            "spatial": ["--method", "spatial"],
            "uncertainty": ["--uncertainty"], "simplified": ["--model", "simplified"],
            "warm": []}

FLOAT64_CHILD = """
import sys, numpy as np, nibabel as nib, fastivim
from fastivim.io import auto_mask
img = nib.load(sys.argv[1])
data = img.get_fdata()                       # float64, as nibabel users call it
b = np.loadtxt(sys.argv[2], ndmin=1)
mask, _ = auto_mask(data, b)
res = fastivim.fit_ivim(data, b, mask=mask)
print(int(res.quality_mask.sum()))
"""


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(cmd, env) -> dict:
    """Run ``cmd``; return wall and CPU seconds and its stderr.

    The child runs in the temporary folder: ``python -m`` puts its working directory first on
    ``sys.path``, so from a checkout's root it would import that checkout, not ``--src``.
    """
    c0 = child_cpu()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                       cwd=Path(env["NUMBA_CACHE_DIR"]).parent)
    wall = time.perf_counter() - t0
    cpu = child_cpu() - c0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "stderr": p.stderr, "stdout": p.stdout}


def make_image(folder: Path, shape) -> tuple:
    from fastivim import io
    from fastivim.simulate import phantom

    path = folder / "dwi.nii.gz"
    io.write_phantom(path, phantom(shape, snr=30, seed=0))
    return path, io.bval_sidecar(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="128x128x30", help="spatial size (10 b-values)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--src", default=None, help="checkout to import fastivim from")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the table here")
    a = p.parse_args()
    shape = tuple(int(v) for v in a.shape.lower().split("x"))
    cases = [c for c in a.cases.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="fastivim-bench-compile-") as tmp:
        tmp = Path(tmp)
        dwi, bval = make_image(tmp, shape)
        base_env = dict(os.environ, NUMBA_NUM_THREADS=str(a.threads))
        if a.src:
            base_env["PYTHONPATH"] = os.pathsep.join(
                [str(Path(a.src).resolve()), base_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        first_cache = tmp / "cache-first"
        rows = {}

        def cli(case, cache):
            out = tmp / f"out-{case}"
            cmd = [sys.executable, "-m", "fastivim.cli", "run", str(dwi), "-o", str(out),
                   "--overwrite", "--threads", str(a.threads), *RUN_ARGS[case]]
            r = run_child(cmd, dict(base_env, NUMBA_CACHE_DIR=str(cache)))
            rec = json.loads((out / "fastivim.json").read_text())
            r["load_kernel_s"] = rec["timings"].get("load_kernel")
            r["fit_s"] = rec["timings"]["fit"]
            return r

        # the first run always happens: every other case starts from its cache
        rows["first"] = cli("first", first_cache)
        for case in cases:
            if case in ("first", "warm"):
                continue
            cache = tmp / f"cache-{case}"
            shutil.copytree(first_cache, cache)
            if case == "float64":
                cmd = [sys.executable, "-c", FLOAT64_CHILD, str(dwi), str(bval)]
                r = run_child(cmd, dict(base_env, NUMBA_CACHE_DIR=str(cache)))
                r["load_kernel_s"] = r["fit_s"] = None
                rows[case] = r
            else:
                rows[case] = cli(case, cache)
        rows["warm"] = cli("warm", first_cache)
    warm = rows["warm"]["wall_s"]
    warm_cpu = rows["warm"]["cpu_s"]
    src = a.src or str(ROOT)
    print(f"fastivim first-use costs: {'x'.join(map(str, shape))}x10 float32 phantom, "
          f"{a.threads} threads, sources {src}")
    print(f"{'case':<12}{'wall s':>8}{'CPU s':>8}{'load_kernel s':>15}{'fit s':>8}"
          f"{'adds wall s':>13}{'adds CPU s':>12}")
    for case in [c for c in CASES if c in rows]:
        r = rows[case]
        lk = "" if r["load_kernel_s"] is None else f"{r['load_kernel_s']:.2f}"
        fs = "" if r["fit_s"] is None else f"{r['fit_s']:.2f}"
        print(f"{case:<12}{r['wall_s']:>8.2f}{r['cpu_s']:>8.2f}{lk:>15}{fs:>8}"
              f"{r['wall_s'] - warm:>13.2f}{r['cpu_s'] - warm_cpu:>12.2f}")
    print("'adds': over the warm run (same command, cache present); 'first' adds its compile, "
          "the others what they compile beyond the first run's cache.")
    print("stderr of the first run:")
    print("  " + "\n  ".join(rows["first"]["stderr"].strip().splitlines()[-8:]))
    if a.json:
        Path(a.json).write_text(json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk != "stdout"} for k, v in rows.items()},
            indent=1))


if __name__ == "__main__":
    main()
