"""Throughput of fastivim's compiled kernels (issue 2's speed table).

voxels/s of ``fit_voxels`` for the ``segmented`` and ``full`` methods on a phantom with 10
b-values (0…800 s/mm²) and SNR 30 (Rician), for 10⁴…10⁶ voxels at 1 and 2 numba threads, beside
a ``scipy.optimize.curve_fit`` per-voxel loop (on a subset) and a NumPy-vectorised
Levenberg–Marquardt (``bench/peers_numpy_lm.py``), all measured in this run. The JIT compile is
excluded from the throughput (a warm-up call first) and reported separately, measured in fresh
processes with an empty and then a warm numba cache. Accuracy (median absolute relative error
against the ground truth, fraction in the quality mask) and the peak extra memory of a 10⁶-voxel
fit (VmHWM in a fresh process, relative to the input's size) complete the table.

A second table compares the two compiled kernels in the same run (issue 10): voxels/s of the
block kernel (the default) and of the scalar reference kernel (``_kernel="scalar"``) for both
methods, at SNR 20, 30 and noise-free, on 10⁶ voxels with the 10 default b-values and on a
clinical scheme with repeated b-values (9 low b-values, 3 directions at each of 250, 400, 600,
800, 1000 s/mm²), on 1 and 2 threads, with the ratio block/scalar and the ratio to osipy's
``fit_ivim`` where an osipy environment exists (``.venv-osipy`` or ``$OSIPY_PYTHON``; osipy
needs Python >= 3.12; the table says so when it is missing).

Run::

    .venv/bin/python bench/bench_kernels.py           # full tables (several minutes on 2 cores)
    .venv/bin/python bench/bench_kernels.py --quick   # 10⁴ and 10⁵ voxels only (< 2 minutes)
    .venv/bin/python bench/bench_kernels.py --kernels-only   # the kernel table, compile, memory

Writes ``bench/out/kernels.{csv,json,txt}``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    OUT_DIR,
    accuracy,
    best_time,
    compile_times,
    machine_info,
    peak_fit_memory,
    print_table,
    tee_printer,
    write_outputs,
)
from peers_numpy_lm import fit_numpy_lm  # noqa: E402
from peers_scipy import fit_curve_fit  # noqa: E402

import fastivim  # noqa: E402

SNR = 30.0
METHODS = ("segmented", "full")
#: Targets of issue 10 on the 2-core reference machine (voxels/s, largest size, all threads).
TARGETS = {"full": 2_000_000, "segmented": 6_000_000}
MEMORY_TARGET = 1.5  # peak extra memory / input bytes, 10⁶ voxels (issue 10)
COMPILE_TARGET_S = 40.0  # cold compile, fresh cache (issue 10)
WARM_TARGET_S = 1.0  # first call with a warm cache (issue 10)

#: The kernel comparison: SNRs (None: noise-free) and b-value schemes.
KERNEL_SNRS = (20.0, 30.0, None)
CLINICAL_B = np.array([0, 10, 20, 30, 50, 80, 100, 150, 200]
                      + [b for b in (250, 400, 600, 800, 1000) for _ in range(3)], dtype=float)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="short run: 10⁴ and 10⁵ voxels, small peer subsets, memory at 10⁵")
    p.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                   help="comma-separated voxel counts (default 1e4,1e5,1e6)")
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated numba thread counts (default 1 and all)")
    p.add_argument("--scipy-voxels", type=int, help="curve_fit subset size (default 300)")
    p.add_argument("--numpy-voxels", type=int, help="NumPy-LM subset size (default 1e5)")
    p.add_argument("--no-compile", action="store_true", help="skip the fresh-process JIT timing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (bench/out)")
    p.add_argument("--kernels-only", action="store_true",
                   help="only the block/scalar kernel table (with compile and memory)")
    p.add_argument("--kernel-voxels", type=lambda s: int(float(s)),
                   help="voxels per phantom of the kernel table (default 1e6, 1e5 with --quick)")
    p.add_argument("--osipy-python", default=os.environ.get("OSIPY_PYTHON"),
                   help="interpreter of a Python >= 3.12 env with osipy (default "
                        "$OSIPY_PYTHON, else .venv-osipy/bin/python)")
    return p.parse_args(argv)


def kernel_phantoms(n):
    """{name: (Y float32 (n, n_b), b)}: the default scheme and the clinical one, per SNR."""
    out = {}
    for snr in KERNEL_SNRS:
        tag = "inf" if snr is None else f"{snr:g}"
        ph = fastivim.simulate.phantom(n, snr=snr, seed=100 + int(snr or 0))
        out[f"default_snr{tag}"] = (np.ascontiguousarray(ph.signal, np.float32), ph.b_values)
        ph = fastivim.simulate.phantom(n, b_values=CLINICAL_B, snr=snr, seed=200 + int(snr or 0))
        out[f"clinical_snr{tag}"] = (np.ascontiguousarray(ph.signal, np.float32), CLINICAL_B)
    return out


def kernel_table(a, say, threads, min_time):
    """Block vs scalar kernel (and osipy) voxels/s on every kernel phantom; returns the rows."""
    from bench_peers import find_osipy_python, run_osipy

    n = a.kernel_voxels or (100_000 if a.quick else 1_000_000)
    phantoms = kernel_phantoms(n)
    for m in METHODS:  # warm-up: compile or load both kernels in this process
        for k in ("block", "scalar"):
            fastivim.fit_voxels(phantoms["default_snr30"][0][:3000],
                                phantoms["default_snr30"][1], method=m, _kernel=k)
    rows = []
    for name, (Y, b) in phantoms.items():
        for m in METHODS:
            for nt in threads:
                numba.set_num_threads(nt)
                rate = {}
                for k in ("block", "scalar"):
                    dt, _ = best_time(lambda Y=Y, b=b, m=m, k=k: fastivim.fit_voxels(
                        Y, b, method=m, _kernel=k), min_time=min_time, max_repeats=3)
                    rate[k] = n / dt
                rows.append(dict(phantom=name, method=m, threads=nt, n_vox=n,
                                 block_vox_s=rate["block"], scalar_vox_s=rate["scalar"],
                                 block_x_scalar=rate["block"] / rate["scalar"]))
                say(f"  {name:17s} {m:9s} {nt} thr: block {rate['block']:>11,.0f}  scalar "
                    f"{rate['scalar']:>11,.0f} voxels/s  block/scalar "
                    f"{rate['block'] / rate['scalar']:.2f}")
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    python, info = find_osipy_python(a.osipy_python)
    osipy_note = None
    if python is None:
        osipy_note = f"osipy unavailable: {info}"
    else:
        try:
            res, _ = run_osipy(python, phantoms)
            for r in rows:
                r["osipy_vox_s"] = n / res[(r["phantom"], r["method"])][1]
                r["block_x_osipy"] = r["block_vox_s"] / r["osipy_vox_s"]
        except RuntimeError as e:
            osipy_note = f"osipy failed: {str(e).splitlines()[-1:]}"
    cols = [("phantom", "phantom", None), ("method", "method", None), ("threads", "thr", "d"),
            ("n_vox", "voxels", ",d"), ("block_vox_s", "block vox/s", ",.0f"),
            ("scalar_vox_s", "scalar vox/s", ",.0f"), ("block_x_scalar", "block/scalar", ".2f"),
            ("osipy_vox_s", "osipy vox/s", ",.0f"), ("block_x_osipy", "block/osipy", ".1f")]
    out = io.StringIO()
    with redirect_stdout(out):
        print_table(rows, cols, title="\nblock vs scalar kernel, same run (best of up to 3; "
                    "float32 input; default = 10 b-values 0..800, clinical = 9 low b-values + "
                    "3 directions x 250/400/600/800/1000 s/mm²; snrinf = noise-free)")
    say(out.getvalue().rstrip("\n"))
    if osipy_note:
        say(f"  ({osipy_note}: the osipy columns are empty)")
    for m in METHODS:
        for nt in threads:
            f = [r["block_x_scalar"] for r in rows if r["method"] == m and r["threads"] == nt]
            d = [r["block_x_scalar"] for r in rows if r["method"] == m and r["threads"] == nt
                 and r["phantom"].startswith("default")]
            c = [r["block_x_scalar"] for r in rows if r["method"] == m and r["threads"] == nt
                 and r["phantom"].startswith("clinical")]
            say(f"  block/scalar {m:9s} {nt} thr: {min(f):.2f}..{max(f):.2f} (default scheme "
                f"mean {np.mean(d):.2f}, clinical mean {np.mean(c):.2f}; clinical/default "
                f"{np.mean(c) / np.mean(d):.2f})")
    return rows, osipy_note


def main(argv=None):
    a = parse_args(argv)
    sizes = a.sizes or ([10_000, 100_000] if a.quick else [10_000, 100_000, 1_000_000])
    max_threads = numba.config.NUMBA_NUM_THREADS
    threads = a.threads or sorted({1, max_threads})
    n_scipy = a.scipy_voxels or (100 if a.quick else 300)
    n_numpy = min(a.numpy_voxels or (10_000 if a.quick else 100_000), max(sizes))
    min_time = 0.3 if a.quick else 1.0
    meta = machine_info()
    meta.update(snr=SNR, sizes=sizes, threads=threads, quick=a.quick)
    say, buf = tee_printer()

    say(f"fastivim {meta['fastivim']} kernel bench  {meta['date']}")
    say(f"{meta['cpu']}, {meta['cores']} cores; numba {meta['numba']} (max {max_threads} "
        f"threads), numpy {meta['numpy']}, Python {meta['python']}")

    # -- JIT compile, in fresh processes (cold cache, then warm cache)
    if not a.no_compile:
        ct = compile_times(METHODS)
        meta["compile"] = ct
        say("JIT compile (fresh process, first fit_voxels on 200 voxels; both methods share "
            "one kernel):")
        for label in ("cold", "warm"):
            d = ct[label]
            say(f"  {label:4s} cache: import {d['import_s']:.2f} s, first segmented call "
                f"{d['segmented_first_call_s']:.2f} s, first full call "
                f"{d['full_first_call_s']:.2f} s; process {d['process_wall_s']:.1f} s")

    # -- block vs scalar kernel (issue 10), with osipy where available
    say("\nblock vs scalar kernel (voxels/s measured in this run; on a shared machine the "
        "absolute figures are noisy, the ratios within a row are not):")
    krows, osipy_note = kernel_table(a, say, threads, min_time)
    meta["kernel_rows"] = krows
    meta["osipy"] = osipy_note or "ran"

    rows = []
    if not a.kernels_only:
        rows = _sweep(a, say, sizes, threads, n_scipy, n_numpy, min_time)

    # -- peak memory of the largest fit, fresh process
    mem_rows = []
    if not a.no_memory:
        n_mem = 100_000 if a.quick else 1_000_000
        ph = fastivim.simulate.phantom(n_mem, snr=SNR, seed=0)
        Y, b = np.ascontiguousarray(ph.signal, np.float32), ph.b_values
        say(f"\npeak extra RSS of one fit_voxels call on {n_mem:,} voxels (fresh process, "
            f"VmHWM after a reset, {max_threads} threads):")
        for m in METHODS:
            d = peak_fit_memory(Y[:n_mem], b, m, max_threads)
            mem_rows.append(d)
            say(f"  {m:9s}: +{d['peak_extra_bytes'] / 2**20:7.1f} MiB = "
                f"{d['ratio_to_input']:.2f} x input ({d['input_bytes'] / 2**20:.1f} MiB "
                f"{Y.dtype}){'' if d['exact_reset'] else '  (peak not reset: upper bound)'}")
        meta["memory"] = mem_rows

    # -- targets
    say("\ntargets (issue 10, 2-core machine, block kernel, all threads; the lead reruns "
        "them on a quiet machine):")
    for m, target in TARGETS.items():
        for r in krows:
            if r["method"] != m or r["threads"] != max(threads) or not r["phantom"].startswith(
                    "default"):
                continue
            ok = "MET " if r["block_vox_s"] >= target else "MISS"
            say(f"  {ok} {m:9s} {r['phantom']:17s} {r['block_vox_s']:>12,.0f} voxels/s "
                f"(target {target:,}; {r['block_vox_s'] / target:.2f} of it)")
    if not a.no_compile:
        cold = ct["cold"]["segmented_first_call_s"] + ct["cold"]["full_first_call_s"]
        warm = ct["warm"]["segmented_first_call_s"] + ct["warm"]["full_first_call_s"]
        say(f"  {'MET ' if cold < COMPILE_TARGET_S else 'MISS'} cold compile {cold:.1f} s "
            f"(target < {COMPILE_TARGET_S:g} s)")
        say(f"  {'MET ' if warm < WARM_TARGET_S else 'MISS'} warm start {warm:.2f} s "
            f"(target < {WARM_TARGET_S:g} s)")
    for d in mem_rows:
        ok = "MET " if d["ratio_to_input"] <= MEMORY_TARGET else "MISS"
        say(f"  {ok} {d['method']:9s} peak memory {d['ratio_to_input']:.2f} x input "
            f"(target <= {MEMORY_TARGET:g} x, {d['n_vox']:,} voxels)")

    paths = write_outputs("kernels" + ("_quick" if a.quick else ""), rows + krows, meta,
                          a.out, text=buf.getvalue())
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return rows


def _sweep(a, say, sizes, threads, n_scipy, n_numpy, min_time):
    """The voxels/s table of issue 2: default kernel by size and threads, and the peers."""
    max_threads = numba.config.NUMBA_NUM_THREADS
    # -- the phantom: 1-D, every voxel tissue; smaller sizes are its first rows
    t = time.perf_counter()
    ph = fastivim.simulate.phantom(max(sizes), snr=SNR, seed=0)
    Y, b = ph.signal, ph.b_values
    truth = ph.truth()
    say(f"phantom: {Y.shape[0]:,} voxels x {Y.shape[1]} b-values {b.astype(int).tolist()} "
        f"s/mm², {Y.dtype}, SNR {SNR:g} (Rician), made in {time.perf_counter() - t:.1f} s")
    for m in METHODS:  # warm-up: compile or load the cache in this process
        fastivim.fit_voxels(Y[:100], b, method=m)

    rows = []

    def sub(d, n):
        return {k: v[:n] for k, v in d.items()}

    # -- peers first (their speed is the denominator of the ratios)
    t = time.perf_counter()
    sp = fit_curve_fit(Y[:n_scipy], b)
    scipy_rate = n_scipy / (time.perf_counter() - t)
    rows.append(dict(fitter="scipy curve_fit loop", method="full", threads=1, n_vox=n_scipy,
                     vox_s=scipy_rate, in_qmask=float(np.mean(~sp["failed"])),
                     **accuracy(sp, sub(truth, n_scipy))))
    fit_numpy_lm(Y[:1000], b)  # warm caches
    t_np, nl = best_time(lambda: fit_numpy_lm(Y[:n_numpy], b), min_time=0.0, max_repeats=1)
    numpy_rate = n_numpy / t_np
    rows.append(dict(fitter="numpy vectorised LM", method="full", threads=1, n_vox=n_numpy,
                     vox_s=numpy_rate, in_qmask=float(np.mean(nl["converged"])),
                     **accuracy(nl, sub(truth, n_numpy))))

    # -- fastivim sweep
    for m in METHODS:
        for nt in threads:
            numba.set_num_threads(nt)
            for n in sizes:
                Yn = Y[:n]
                dt, res = best_time(lambda Yn=Yn, m=m: fastivim.fit_voxels(Yn, b, method=m),
                                    min_time=min_time, max_repeats=5)
                est = {"D": res.D, "D_star": res.D_star, "f": res.f}
                rows.append(dict(fitter="fastivim", method=m, threads=nt, n_vox=n,
                                 vox_s=n / dt, in_qmask=float(res.quality_mask.mean()),
                                 **accuracy(est, sub(truth, n))))
    numba.set_num_threads(max_threads)
    for r in rows:
        r["x_scipy"] = r["vox_s"] / scipy_rate
        r["x_numpy_lm"] = r["vox_s"] / numpy_rate

    cols = [("fitter", "fitter", None), ("method", "method", None), ("threads", "thr", "d"),
            ("n_vox", "voxels", ",d"), ("vox_s", "voxels/s", ",.0f"),
            ("x_scipy", "x scipy", ",.0f"), ("x_numpy_lm", "x numpyLM", ".3g"),
            ("D_mare", "D err", ".3f"), ("D_star_mare", "D* err", ".3f"),
            ("f_mare", "f err", ".3f"), ("in_qmask", "in mask", ".3f")]
    out = io.StringIO()
    with redirect_stdout(out):
        print_table(rows, cols, title="\nvoxels/s (best of up to 5 runs, JIT excluded); err = "
                    "median |estimate/truth - 1| over all voxels (failed = inf); in mask = "
                    "fraction in quality mask (peers: converged / no exception)")
    say(out.getvalue().rstrip("\n"))

    return rows


if __name__ == "__main__":
    main()
