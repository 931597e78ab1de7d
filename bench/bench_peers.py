"""fastivim side by side with the IVIM fitters people use today (issue 4).

On the same phantom voxels, one fitter after another in one run:

* fastivim ``segmented`` and ``full`` (numba kernels);
* a NumPy-vectorised Levenberg–Marquardt (``bench/peers_numpy_lm.py``);
* ``scipy.optimize.curve_fit`` called per voxel with bounds (``bench/peers_scipy.py``);
* dipy's ``IvimModel`` (``dipy.reconst.ivim``): the default ``trr`` fit with dipy's default
  bounds, the same with fastivim's bounds, and ``VarPro`` when cvxpy is installed;
* osipy's ``fit_ivim`` (segmented and full), run in osipy's own Python >= 3.12 environment
  (``.venv-osipy`` or ``$OSIPY_PYTHON``) as a subprocess on the same saved phantom.

Phantoms: ground truth D 0.5–2e-3, D_star 10–80e-3 mm²/s (log-uniform), f 0.05–0.35, S0 1000,
Rician noise at SNR 20, 50 and noise-free, for two schemes: 10 b-values (0…800 s/mm²) and a
clinical-style scheme with repeated b-values (2 × b0, 3 directions at each b > 0).
Slow peers fit the first voxels of each phantom only; their voxels/s is extrapolated (marked *).
Peers that are not installed are skipped with the reason printed.

Then fastivim's scaling: voxels/s and peak extra memory from 10³ to 10⁶ voxels at 1 and 2
threads, and the JIT compile time in fresh processes (empty cache, then warm cache).

Run::

    .venv/bin/python bench/bench_peers.py          # ~5 minutes on 2 cores
    .venv/bin/python bench/bench_peers.py --quick  # ~1 minute

Writes ``bench/out/peers.{csv,json,txt}``, ``peers_scaling.{csv,json}`` and
``peers_speed_accuracy.png`` (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    OUT_DIR,
    REPO_DIR,
    accuracy,
    at_bound_mask,
    best_time,
    compile_times,
    machine_info,
    peak_fit_memory,
    print_table,
    tee_printer,
    write_outputs,
)
from peers_numpy_lm import BOUNDS as NUMPY_LM_BOUNDS  # noqa: E402
from peers_numpy_lm import fit_numpy_lm  # noqa: E402
from peers_scipy import BOUNDS as SCIPY_BOUNDS  # noqa: E402
from peers_scipy import fit_curve_fit  # noqa: E402

import fastivim  # noqa: E402
from fastivim.kernels import status as st  # noqa: E402

SCHEMES = {
    "10b": np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800], dtype=float),
    # clinical style: 2 x b0, then 3 diffusion directions per b (trace-weighted IVIM protocols)
    "clinical": np.array([0, 0] + [b for b in (10, 20, 50, 100, 200, 400, 800) for _ in range(3)],
                         dtype=float),
}
SNRS = (20.0, 50.0, np.inf)
FASTIVIM_BOUNDS = {k: v for k, v in fastivim.DEFAULT_BOUNDS.items()}
DIPY_DEFAULT_BOUNDS = {"S0": (0.0, np.inf), "f": (0.0, 0.2), "D_star": (0.0, 1.0), "D": (0.0, 1.0)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small phantoms and subsets (~1 min)")
    p.add_argument("--voxels", type=int, help="voxels per phantom for fast fitters (1e5)")
    p.add_argument("--slow-voxels", type=int, help="subset for scipy/dipy trr (400)")
    p.add_argument("--varpro-voxels", type=int, help="subset for dipy VarPro (40)")
    p.add_argument("--osipy-python", default=os.environ.get("OSIPY_PYTHON"),
                   help="interpreter of a Python >= 3.12 env with osipy "
                        "(default $OSIPY_PYTHON, else .venv-osipy/bin/python)")
    p.add_argument("--skip", default="", help="comma-separated fitter keys to skip "
                   "(numpy_lm,scipy,dipy_trr,dipy_trr_fb,dipy_varpro,osipy)")
    p.add_argument("--no-scaling", action="store_true", help="skip the fastivim scaling sweep")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ fitters
def run_fastivim(method):
    def fit(Y, b):
        r = fastivim.fit_voxels(Y, b, method=method)
        failed = np.isin(r.status, (st.NO_CONVERGENCE, st.BAD_INPUT, st.NUMERICAL_FAILURE))
        bound = np.isin(r.status, (st.AT_BOUND, st.DSTAR_NOT_ABOVE_D))
        return {"D": r.D, "D_star": r.D_star, "f": r.f, "failed": failed, "at_bound": bound}
    return fit


def run_numpy_lm(Y, b):
    r = fit_numpy_lm(Y, b)
    failed = ~np.isfinite(r["D"]) | ~r["converged"]
    return dict(r, failed=failed, at_bound=at_bound_mask(r, NUMPY_LM_BOUNDS))


def run_scipy(Y, b):
    r = fit_curve_fit(Y, b)
    return dict(r, at_bound=at_bound_mask(r, SCIPY_BOUNDS))


def dipy_fitter(fit_method, bounds=None):
    """A dipy IvimModel fit on (n_vox, n_b) rows; None (and a reason) if dipy is missing."""
    try:
        from dipy.core.gradients import gradient_table
        from dipy.reconst.ivim import IvimModel
    except ImportError as e:
        return None, f"dipy not installed ({e})"
    if fit_method == "VarPro":
        try:
            import cvxpy  # noqa: F401
        except ImportError:
            return None, "VarPro needs cvxpy, not installed"

    def fit(Y, b):
        bvecs = np.zeros((b.size, 3))
        bvecs[b > 0, 0] = 1.0
        gtab = gradient_table(b, bvecs=bvecs, b0_threshold=0)
        kw = {}
        if bounds is not None:
            kw["bounds"] = ([bounds[k][0] for k in ("S0", "f", "D_star", "D")],
                            [bounds[k][1] for k in ("S0", "f", "D_star", "D")])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = IvimModel(gtab, fit_method=fit_method, **kw)
            r = model.fit(np.asarray(Y, dtype=np.float64))
        P = np.asarray(r.model_params, dtype=np.float64).reshape(-1, 4)
        est = {"S0": P[:, 0], "f": P[:, 1], "D_star": P[:, 2], "D": P[:, 3]}
        failed = ~np.all(np.isfinite(P), axis=1)
        bnd = bounds or DIPY_DEFAULT_BOUNDS
        return dict(est, failed=failed, at_bound=at_bound_mask(est, bnd))
    return fit, None


def find_osipy_python(arg):
    cands = [arg] if arg else [str(REPO_DIR / ".venv-osipy" / "bin" / "python")]
    for c in cands:
        if c and (os.path.exists(c) or shutil.which(c)):
            chk = subprocess.run([c, "-c", "import sys, osipy; print(sys.version.split()[0], "
                                  "getattr(osipy, '__version__', '?'))"],
                                 capture_output=True, text=True)
            if chk.returncode == 0:
                return c, chk.stdout.strip()
            return None, f"{c} cannot import osipy: {chk.stderr.strip().splitlines()[-1:]}"
    return None, ("no osipy environment (osipy needs Python >= 3.12; create .venv-osipy with "
                  "`make peers-env` or set OSIPY_PYTHON)")


def run_osipy(python, phantoms):
    """Fit every phantom with osipy in a subprocess; return {(name, method): (est, seconds)}."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        arrays = {"names": np.array(list(phantoms))}
        for name, (Y, b) in phantoms.items():
            arrays[name + "__Y"] = Y
            arrays[name + "__b"] = b
        np.savez(src, **arrays)
        proc = subprocess.run([python, str(Path(__file__).with_name("osipy_runner.py")), src,
                               dst], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip()[-2000:])
        d = np.load(dst)
        timing = json.loads(str(d["timing"]))
        res = {}
        for name in phantoms:
            for m in ("segmented", "full"):
                k = f"{name}__{m}__"
                est = {p: d[k + p] for p in ("D", "D_star", "f", "S0")}
                est["failed"] = ~d[k + "qmask"] | ~np.isfinite(est["D"])
                est["at_bound"] = at_bound_mask(est, FASTIVIM_BOUNDS)  # osipy's = fastivim's
                res[(name, m)] = (est, timing["fits"][f"{name}__{m}"])
        return res, timing


# ------------------------------------------------------------------------------ main
def main(argv=None):
    a = parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    n_fast = a.voxels or (10_000 if a.quick else 100_000)
    n_slow = a.slow_voxels or (60 if a.quick else 400)
    n_varpro = a.varpro_voxels or (8 if a.quick else 40)
    max_threads = numba.config.NUMBA_NUM_THREADS
    meta = machine_info()
    meta.update(quick=a.quick, n_fast=n_fast, n_slow=n_slow, n_varpro=n_varpro,
                schemes={k: v.tolist() for k, v in SCHEMES.items()},
                snrs=[str(s) for s in SNRS], truth=fastivim.simulate.TRUTH_RANGES)
    say, buf = tee_printer()

    say(f"fastivim {meta['fastivim']} vs peers  {meta['date']}")
    say(f"{meta['cpu']}, {meta['cores']} cores; numba {meta['numba']}, numpy {meta['numpy']}, "
        f"Python {meta['python']}; fastivim with {max_threads} threads")

    # ---- fitters: (key, label, fit function, voxels it gets, note)
    fitters = [("fastivim_seg", "fastivim segmented", run_fastivim("segmented"), n_fast),
               ("fastivim_full", "fastivim full", run_fastivim("full"), n_fast),
               ("numpy_lm", "numpy vectorised LM", run_numpy_lm, n_fast),
               ("scipy", "scipy curve_fit loop", run_scipy, n_slow)]
    skipped = {}
    for key, label, method, bounds, n in (
            ("dipy_trr", "dipy trr (dipy bounds)", "trr", None, n_slow),
            ("dipy_trr_fb", "dipy trr (fastivim bounds)", "trr", FASTIVIM_BOUNDS, n_slow),
            ("dipy_varpro", "dipy VarPro", "VarPro", None, n_varpro)):
        fit, why = dipy_fitter(method, bounds)
        if fit is None:
            skipped[label] = why
        else:
            fitters.append((key, label, fit, n))
    fitters = [f for f in fitters if f[0] not in skip]
    osipy_python = None
    if "osipy" not in skip:
        osipy_python, info = find_osipy_python(a.osipy_python)
        if osipy_python is None:
            skipped["osipy segmented/full"] = info
        else:
            meta["osipy"] = info
            say(f"osipy: Python/osipy {info} via {osipy_python} (subprocess)")
    try:
        import dipy

        meta["dipy"] = dipy.__version__
        say(f"dipy {dipy.__version__}")
    except ImportError:
        pass
    for label, why in skipped.items():
        say(f"SKIPPED {label}: {why}")

    # ---- JIT (fresh processes) and warm-up here
    ct = compile_times(("segmented", "full"))
    meta["compile"] = ct
    say(f"fastivim JIT: cold cache {ct['cold']['segmented_first_call_s']:.2f} s + "
        f"{ct['cold']['full_first_call_s']:.2f} s (segmented, full first calls; one shared "
        f"kernel), warm cache {ct['warm']['segmented_first_call_s']:.2f} s; import "
        f"{ct['warm']['import_s']:.2f} s. Excluded from voxels/s below.")
    ph0 = fastivim.simulate.phantom(64, seed=0)
    for m in ("segmented", "full"):
        fastivim.fit_voxels(ph0.signal, ph0.b_values, method=m)
    fit_numpy_lm(ph0.signal, ph0.b_values)

    # ---- phantoms
    phantoms, truths = {}, {}
    for i, (sname, b) in enumerate(SCHEMES.items()):
        for j, snr in enumerate(SNRS):
            ph = fastivim.simulate.phantom(n_fast, b_values=b, snr=snr, seed=100 + 10 * i + j)
            name = f"{sname}_snr{'inf' if not np.isfinite(snr) else int(snr)}"
            phantoms[name] = (ph.signal, b)
            truths[name] = ph.truth()

    # ---- fit everything
    rows = []

    def record(key, label, name, est, seconds, n):
        sname, snr = name.split("_snr")
        t = {k: v[:n] for k, v in truths[name].items()}
        row = dict(fitter=label, key=key, scheme=sname, snr=snr, n_vox=n,
                   extrapolated=n < n_fast, vox_s=n / seconds,
                   fail=float(np.mean(est["failed"])), at_bound=float(np.mean(est["at_bound"])))
        row.update(accuracy(est, t))
        rows.append(row)
        ext = "*" if row["extrapolated"] else " "
        print(f"  {label:28s} {name:16s} {n:>7,d} vox  {row['vox_s']:>12,.1f}{ext} vox/s",
              flush=True)

    for key, label, fit, n in fitters:
        for name, (Y, b) in phantoms.items():
            Yn = np.ascontiguousarray(Y[:n])
            if key.startswith("fastivim"):
                sec, est = best_time(lambda Yn=Yn, b=b, fit=fit: fit(Yn, b), min_time=0.5,
                                     max_repeats=5)
            else:
                t0 = time.perf_counter()
                est = fit(Yn, b)
                sec = time.perf_counter() - t0
            record(key, label, name, est, sec, n)
    if osipy_python is not None:
        try:
            res, timing = run_osipy(osipy_python, phantoms)
            meta["osipy_timing"] = timing
            say(f"osipy import {timing['import_s']:.2f} s, first call "
                f"{timing['first_call_s']:.2f} s (excluded)")
            for name in phantoms:
                for m in ("segmented", "full"):
                    est, sec = res[(name, m)]
                    record(f"osipy_{m}", f"osipy {m}", name, est, sec, n_fast)
        except Exception as e:  # a broken peer must not sink the bench
            skipped["osipy segmented/full"] = f"failed: {e}"
            say(f"SKIPPED osipy: {e}")

    # ratio to fastivim full on the same phantom
    ref = {(r["scheme"], r["snr"]): r["vox_s"] for r in rows if r["key"] == "fastivim_full"}
    for r in rows:
        r["x_fastivim_full"] = r["vox_s"] / ref[(r["scheme"], r["snr"])]
        r["speed"] = f"{r['vox_s']:,.0f}{'*' if r['extrapolated'] else ''}"
        for p in ("D", "D_star"):
            r[f"{p}_mae_e3"] = r[f"{p}_mae"] * 1e3
    order = {k: i for i, (k, *_rest) in enumerate(fitters)}
    order.update(osipy_segmented=len(order), osipy_full=len(order) + 1)
    rows.sort(key=lambda r: (list(SCHEMES).index(r["scheme"]), ["20", "50", "inf"].index(r["snr"]),
                             order[r["key"]]))

    cols = [("scheme", "scheme", None), ("snr", "SNR", None), ("fitter", "fitter", None),
            ("n_vox", "voxels", ",d"), ("speed", "voxels/s", None),
            ("x_fastivim_full", "x full", ".3g"),
            ("D_mae_e3", "D MAE", ".4f"), ("D_w10", "D ≤10%", ".3f"),
            ("D_star_mae_e3", "D* MAE", ".2f"), ("D_star_w10", "D* ≤10%", ".3f"),
            ("f_mae", "f MAE", ".4f"), ("f_w10", "f ≤10%", ".3f"),
            ("fail", "fail", ".3f"), ("at_bound", "bound", ".3f")]
    out = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, out
    try:
        prev = None
        block = []
        for r in rows + [None]:
            k = None if r is None else (r["scheme"], r["snr"])
            if prev is not None and k != prev:
                print_table(block, cols)
                print()
                block = []
            if r is not None:
                block.append(r)
            prev = k
    finally:
        sys.stdout = sys_stdout
    say("\nPeers on the same voxels (one run). voxels/s: JIT/import excluded; * = measured on the "
        "first 'voxels' of the phantom and extrapolated; x full = voxels/s / fastivim full's on "
        "the same phantom. MAE = median absolute error (D, D* in 1e-3 mm²/s; f absolute); "
        "≤10% = fraction of voxels within 10% of the truth; failed voxels count as misses. "
        "fail = fitter reports failure/non-convergence; bound = D, D* or f on one of the "
        "fitter's bounds (fastivim: AT_BOUND or D*≤D status).\n")
    say(out.getvalue().rstrip("\n"))
    meta["skipped"] = skipped

    # ---- scaling
    scal_rows = []
    if not a.no_scaling:
        sizes = [1_000, 10_000, 100_000] + ([] if a.quick else [1_000_000])
        ph = fastivim.simulate.phantom(max(sizes), snr=20, seed=7)
        Y, b = ph.signal, ph.b_values
        for m in ("segmented", "full"):
            for n in sizes:
                row = dict(method=m, n_vox=n)
                for nt in sorted({1, max_threads}):
                    numba.set_num_threads(nt)
                    sec, _ = best_time(lambda n=n, m=m: fastivim.fit_voxels(Y[:n], b, method=m),
                                       min_time=0.5 if not a.quick else 0.2, max_repeats=5)
                    row[f"vox_s_{nt}t"] = n / sec
                numba.set_num_threads(max_threads)
                row["thread_speedup"] = row[f"vox_s_{max_threads}t"] / row["vox_s_1t"]
                d = peak_fit_memory(Y[:n], b, m, max_threads)
                row["peak_extra_MiB"] = d["peak_extra_bytes"] / 2**20
                row["input_MiB"] = d["input_bytes"] / 2**20
                row["mem_x_input"] = d["ratio_to_input"]
                scal_rows.append(row)
        scols = [("method", "method", None), ("n_vox", "voxels", ",d"),
                 ("vox_s_1t", "voxels/s 1 thr", ",.0f"),
                 (f"vox_s_{max_threads}t", f"voxels/s {max_threads} thr", ",.0f"),
                 ("thread_speedup", "speedup", ".2f"), ("input_MiB", "input MiB", ".2f"),
                 ("peak_extra_MiB", "peak extra MiB", ".2f"), ("mem_x_input", "x input", ".2f")]
        out = io.StringIO()
        sys_stdout, sys.stdout = sys.stdout, out
        try:
            print_table(scal_rows, scols)
        finally:
            sys.stdout = sys_stdout
        say(f"\nfastivim scaling (10 b-values, SNR 20, float32 input; peak extra RSS of one "
            f"fit_voxels call in a fresh process, {max_threads} threads; small sizes are "
            f"dominated by the interpreter's own page-ins):")
        say(out.getvalue().rstrip("\n"))

    stem = "peers" + ("_quick" if a.quick else "")
    paths = write_outputs(stem, rows, meta, a.out, text=buf.getvalue())
    if scal_rows:
        paths += write_outputs(stem + "_scaling", scal_rows, meta, a.out)
    png = plot(rows, a.out / f"{stem}_speed_accuracy.png", meta)
    if png:
        paths.append(png)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return rows


def plot(rows, path, meta):
    """Speed (log x) versus fraction within 10% for D, D* and f; 10 b-values, SNR 20 and 50."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    labels = []
    for r in rows:
        if r["fitter"] not in labels:
            labels.append(r["fitter"])
    cmap = plt.get_cmap("tab10")
    markers = "os^vDPX*hp"
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.6), sharex=True)
    for ax, p, title in zip(axes, ("D", "D_star", "f"), ("D", "D*", "f"), strict=True):
        for i, lab in enumerate(labels):
            for snr, fill in (("20", True), ("50", False)):
                rr = [r for r in rows if r["fitter"] == lab and r["scheme"] == "10b"
                      and r["snr"] == snr]
                if not rr:
                    continue
                r = rr[0]
                ax.scatter(r["vox_s"], r[f"{p}_w10"], s=80, marker=markers[i % len(markers)],
                           facecolors=cmap(i) if fill else "none", edgecolors=cmap(i),
                           linewidths=1.8, label=f"{lab}" if snr == "20" else None, zorder=3)
            pts = sorted((r["vox_s"], r[f"{p}_w10"]) for r in rows if r["fitter"] == lab
                         and r["scheme"] == "10b" and r["snr"] in ("20", "50"))
            if len(pts) == 2:
                ax.plot(*zip(*pts, strict=True), color=cmap(i), alpha=0.35, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("speed (voxels/s, log scale; * slow peers extrapolated)")
        ax.set_ylabel(f"fraction of voxels with {title} within 10% of truth")
        ax.set_title(f"{title}: accuracy vs speed")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(0, 1)
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=min(5, len(lab)), fontsize=9, frameon=False)
    fig.suptitle(f"IVIM fitters, 10 b-values (0–800 s/mm²), Rician noise: filled = SNR 20, "
                 f"hollow = SNR 50.  {meta['cpu']}, {meta['cores']} cores, {meta['date'][:10]}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
