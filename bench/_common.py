"""Helpers shared by the benchmark scripts (not part of the fastivim package).

Timing, accuracy against a phantom's ground truth, peak-memory and JIT-compile measurements in
fresh subprocesses, and table output (printed, CSV and JSON under ``bench/out/``).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"

#: Parameters compared against ground truth, in report order.
ACC_PARAMS = ("D", "D_star", "f")


# --------------------------------------------------------------------------------- timing
def tee_printer():
    """``(say, buf)``: ``say(*args)`` prints to stdout and records the line in ``buf``."""
    import io

    buf = io.StringIO()

    def say(*args):
        print(*args)
        print(*args, file=buf)
        sys.stdout.flush()

    return say, buf


def best_time(func, min_time=0.5, max_repeats=5):
    """Run ``func()`` until ``min_time`` seconds have passed (at most ``max_repeats`` runs).

    Returns ``(best_seconds, last_return_value)``; the best run is the least disturbed one on
    a shared machine.
    """
    best = np.inf
    spent = 0.0
    value = None
    for _ in range(max_repeats):
        t0 = time.perf_counter()
        value = func()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        if spent >= min_time:
            break
    return best, value


# ------------------------------------------------------------------------------- accuracy
def accuracy(est: dict, truth: dict, tol=0.10) -> dict:
    """Errors of estimated maps against the truth, over every voxel given.

    A voxel whose estimate is not finite (a failed fit) counts as an infinite error: it is never
    "within tol" and pushes the medians up, so fitters that give up are not flattered.

    Returns, for each of D, D_star, f: ``{p}_mare`` (median absolute relative error),
    ``{p}_mae`` (median absolute error, parameter units) and ``{p}_w10`` (fraction of voxels
    with relative error <= tol).
    """
    res = {}
    for p in ACC_PARAMS:
        e = np.asarray(est[p], dtype=np.float64).ravel()
        t = np.asarray(truth[p], dtype=np.float64).ravel()
        ae = np.abs(e - t)
        ae[~np.isfinite(ae)] = np.inf
        rel = ae / np.abs(t)
        res[f"{p}_mare"] = float(np.median(rel))
        res[f"{p}_mae"] = float(np.median(ae))
        res[f"{p}_w10"] = float(np.mean(rel <= tol))
    return res


def at_bound_mask(est: dict, bounds: dict, rtol=1e-4) -> np.ndarray:
    """Voxels where D, D_star or f lies within ``rtol`` of the bound interval of a bound."""
    m = np.zeros(np.asarray(est["D"]).shape, dtype=bool)
    for p in ACC_PARAMS:
        lo, hi = bounds[p]
        x = np.asarray(est[p], dtype=np.float64)
        span = (hi - lo) if np.isfinite(hi) else max(abs(lo), 1.0)
        m |= np.abs(x - lo) <= rtol * span
        if np.isfinite(hi):
            m |= np.abs(x - hi) <= rtol * span
    return m


# --------------------------------------------------------------------------------- memory
def _vm_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_kib():
    return _vm_kib("VmRSS")


def hwm_kib():
    return _vm_kib("VmHWM")


_MEM_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import numba
    sys.path.insert(0, {bench!r})
    from _common import hwm_kib, reset_peak_rss, rss_kib
    import fastivim
    Y = np.load({path!r})
    b = np.array({b!r})
    numba.set_num_threads({threads})
    fastivim.fit_voxels(Y[:64], b, method={method!r})   # compile / load cache, touch the code
    before = rss_kib()
    exact = reset_peak_rss()
    base_hwm = hwm_kib()
    res = fastivim.fit_voxels(Y, b, method={method!r})
    peak = hwm_kib()
    print(json.dumps({{"rss_before_kib": before, "hwm_base_kib": base_hwm,
                       "hwm_after_kib": peak, "exact": exact}}))
    """
)


def peak_fit_memory(Y: np.ndarray, b_values, method: str, threads: int) -> dict:
    """Peak extra resident memory of one ``fit_voxels`` call, measured in a fresh process.

    The input is saved to a temporary ``.npy`` and loaded by the child, which compiles (or loads
    the cache) on a few voxels, resets its peak-RSS counter and fits everything. numba's
    allocations are invisible to tracemalloc, so the kernel's VmHWM is used. Returns the extra
    bytes, the input's bytes and their ratio.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "Y.npy")
        np.save(path, Y)
        code = _MEM_CHILD.format(bench=str(BENCH_DIR), path=path,
                                 b=[float(x) for x in b_values], method=method, threads=threads)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=str(REPO_DIR))
    d = json.loads(out.stdout.strip().splitlines()[-1])
    # without an exact reset, the peak before the fit (numba's compile) may hide the fit's
    extra = (d["hwm_after_kib"] - d["rss_before_kib"]) * 1024
    return {"method": method, "threads": threads, "n_vox": int(Y.shape[0]),
            "input_bytes": int(Y.nbytes), "peak_extra_bytes": int(extra),
            "ratio_to_input": extra / Y.nbytes, "exact_reset": bool(d["exact"])}


# -------------------------------------------------------------------------------- compile
_COMPILE_CHILD = textwrap.dedent(
    """
    import json, time
    t0 = time.perf_counter()
    import numpy as np
    import fastivim
    t1 = time.perf_counter()
    ph = fastivim.simulate.phantom(200, snr=30, seed=1)
    out = {{"import_s": t1 - t0}}
    for m in {methods!r}:
        t = time.perf_counter()
        fastivim.fit_voxels(ph.signal, ph.b_values, method=m)
        out[m + "_first_call_s"] = time.perf_counter() - t
        t = time.perf_counter()
        fastivim.fit_voxels(ph.signal, ph.b_values, method=m)
        out[m + "_second_call_s"] = time.perf_counter() - t
    print(json.dumps(out))
    """
)


def compile_times(methods=("segmented", "full")) -> dict:
    """JIT cost in fresh processes: once with an empty numba cache, once with the cache warm.

    ``NUMBA_CACHE_DIR`` points at a new temporary directory, so the first child compiles every
    kernel from scratch (and writes the cache); the second child starts from that cache, as a
    user's second run does. ``*_first_call_s`` is the first ``fit_voxels`` on 200 voxels
    (compile or cache load included); ``*_second_call_s`` the same call again, for reference.
    """
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        code = _COMPILE_CHILD.format(methods=tuple(methods))
        for label in ("cold", "warm"):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True, env=env, cwd=str(REPO_DIR))
            wall = time.perf_counter() - t
            d = json.loads(out.stdout.strip().splitlines()[-1])
            d["process_wall_s"] = wall
            d["jit_s"] = sum(d[m + "_first_call_s"] - d[m + "_second_call_s"] for m in methods)
            res[label] = d
    return res


# ---------------------------------------------------------------------------------- output
def machine_info() -> dict:
    import numba

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import fastivim

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "fastivim": fastivim.__version__,
        "numba_threads_max": numba.config.NUMBA_NUM_THREADS,
    }


def fmt(v, spec):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-" if v is None else ("inf" if v == np.inf else "nan")
    return format(v, spec)


def print_table(rows, columns, title=None, file=None):
    """Print ``rows`` (dicts) as an aligned text table; ``columns`` = [(key, header, fmt)]."""
    file = file or sys.stdout
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([fmt(r.get(k), f) if f else str(r.get(k, "-")) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    if title:
        print(title, file=file)
    for i, c in enumerate(cells):
        print("  ".join(s.rjust(w) for s, w in zip(c, widths, strict=True)), file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=file)
    file.flush()


def write_outputs(stem: str, rows, meta: dict, out_dir=OUT_DIR, text: str | None = None):
    """Write ``rows`` to ``out_dir/stem.csv`` and rows + meta to ``stem.json``; return paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    csv_path = out_dir / f"{stem}.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    json_path = out_dir / f"{stem}.json"

    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.floating, float)):
            o = float(o)
            return o if np.isfinite(o) else str(o)
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.bool_):
            return bool(o)
        return o

    with open(json_path, "w") as fh:
        json.dump(clean({"meta": meta, "rows": rows}), fh, indent=1)
    paths = [csv_path, json_path]
    if text is not None:
        txt_path = out_dir / f"{stem}.txt"
        txt_path.write_text(text)
        paths.append(txt_path)
    return paths
