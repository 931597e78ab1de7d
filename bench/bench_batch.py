"""Cohort throughput of ``fastivim batch``: subjects per minute, locally and on a Dask cluster.

    .venv/bin/python bench/bench_batch.py                          # 20 subjects, 8x8x3 and 64x64x10
    .venv/bin/python bench/bench_batch.py --subjects 50 --sizes 96x96x20 --workers 2,4

For each size it writes a BIDS tree of ``--subjects`` phantoms under ``bench/out/`` (float32,
10 b-values, SNR 30, one seed per subject; once, then reused), then fits the whole tree into a
fresh derivatives folder with :func:`fastivim.batch.run_batch` (what ``fastivim batch`` runs):

* ``local``: this process, one subject at a time, the numba kernel on all cores;
* ``dask-N``: a Dask ``LocalCluster`` of N worker processes started by the run
  (``--workers N``), each fit with ``cores // N`` numba threads.

A warm-up fit first loads the compiled kernels in this process; the Dask workers load them
themselves, which is part of their start-up. Subjects/min is printed with the start-up of the
cluster included (what a user waits for) and without it (the steady rate).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numba

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastivim import __version__, batch, io  # noqa: E402
from fastivim.simulate import phantom  # noqa: E402

OUT = ROOT / "bench" / "out"


def parse_size(text):
    return tuple(int(v) for v in text.lower().split("x"))


def make_tree(shape, n):
    """``bench/out/batch_bids_<size>_<n>/sub-NNN/dwi/sub-NNN_dwi.nii.gz`` (+ .bval)."""
    root = OUT / f"batch_bids_{'x'.join(map(str, shape))}_{n}"
    for i in range(1, n + 1):
        dwi = root / f"sub-{i:03d}" / "dwi" / f"sub-{i:03d}_dwi.nii.gz"
        if not dwi.exists():
            io.write_phantom(dwi, phantom(shape, snr=30, seed=i), overwrite=True)
            shutil.rmtree(dwi.with_name(io.image_stem(dwi) + "_truth"))
    return root


def run(root, workers):
    deriv = Path(tempfile.mkdtemp(prefix="fastivim-bench-batch-"))
    try:
        rep = batch.run_batch(root, deriv, workers=workers)
    finally:
        shutil.rmtree(deriv, ignore_errors=True)
    assert rep.failed == 0 and rep.reused == 0, rep
    return rep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--sizes", default="8x8x3,64x64x10", help="comma-separated XxYxZ")
    ap.add_argument("--workers", default="2", help="comma-separated Dask worker counts")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",") if w]

    print(f"fastivim {__version__} batch benchmark: {args.subjects} subjects per run, "
          f"{batch.available_cores()} cores, numba {numba.__version__} "
          f"({numba.config.NUMBA_NUM_THREADS} threads max)")
    # warm-up: load (or compile) the kernels in this process
    warm = make_tree((8, 8, 3), 1)
    run(warm, None)

    head = (f"{'size':>10} {'voxels':>7} {'mode':>7} {'wall s':>7} {'start s':>7} "
            f"{'subj/min':>9} {'steady':>7}  threads")
    print(head)
    print("-" * len(head))
    for shape in sizes:
        t0 = time.perf_counter()
        root = make_tree(shape, args.subjects)
        made = time.perf_counter() - t0
        n_vox = shape[0] * shape[1] * shape[2]
        for workers in [None, *worker_counts]:
            rep = run(root, workers)
            steady = 60.0 * args.subjects / max(rep.seconds - rep.startup_seconds, 1e-9)
            mode = "local" if workers is None else f"dask-{workers}"
            print(f"{'x'.join(map(str, shape)):>10} {n_vox:>7} {mode:>7} {rep.seconds:>7.2f} "
                  f"{rep.startup_seconds:>7.2f} {rep.subjects_per_minute:>9.1f} {steady:>7.1f}  "
                  f"{rep.threads}", flush=True)
        if made > 1:
            print(f"{'':>10} (phantoms written in {made:.1f} s, kept under {root})")
    print(f"load: {os.getloadavg()[0]:.1f} (1-min load average at the end)")


if __name__ == "__main__":
    main()
