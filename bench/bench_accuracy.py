"""Accuracy against the truth: segmented, full and bayesian on the tissue phantom (issue 11),
and the spatial method on the lesion phantom (issue 17).

``fastivim.simulate.tissue_phantom`` (organs with the OSIPI TF2.4 tissue values, 10% per-voxel
variation, Rician noise) on a 144 x 144 x 12 volume, for SNR 10, 20, 30, 50 and two b schemes
(OSIPI's 18 b-values, a clinical 11-b protocol). For each tissue and pooled over the body:
RMSE against the truth of D, D_star and f for the three methods, the ratio bayesian / better
least-squares method, and how often the Bayesian 95% interval (mean +- 1.96 posterior SD)
covers the truth. Every voxel of the body counts: a failed voxel (NaN) of any method is an
infinite error. Also voxels/s of each method on the body's voxels (bayesian: noise estimate, EM
prior and posteriors all included), measured in this run after a warm-up (JIT excluded).

The spatial part (issue 17): ``fastivim.simulate.lesion_phantom`` (the same organs with a
smooth ±10% field and 4% jitter per parameter, 18 small lesions inside organs, 1.5 x 1.5 x 4 mm
voxels) on 144 x 144 x 12, two b schemes (the clinical 11-b protocol, and a 16-b one with
repeated b-values), SNR 20 and 30, the four methods: pooled RMSE ratios to the better
least-squares method, each tissue's f and D RMSE of spatial over bayesian, the 95% coverage of
spatial per tissue, the lesion contrast each method keeps (median over lesions) and voxels/s of
bayesian and spatial on the whole body (best of 2 warm fits, wall time; and per CPU-second).

Run::

    .venv/bin/python bench/bench_accuracy.py           # both parts (several minutes on 2 cores)
    .venv/bin/python bench/bench_accuracy.py --quick   # 144 x 144 x 2, SNR 20 and 30 only
    .venv/bin/python bench/bench_accuracy.py --spatial-only   # the lesion-phantom part only

Writes ``bench/out/accuracy.{csv,json,txt}`` and ``bench/out/accuracy_spatial.{csv,json,txt}``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, print_table, tee_printer, write_outputs  # noqa: E402

import fastivim  # noqa: E402
from fastivim.simulate import B_SCHEMES, lesion_contrast, lesion_phantom, tissue_phantom  # noqa: E402

METHODS = ("segmented", "full", "bayesian")
PARAMS = ("D", "D_star", "f")
SNRS = (10, 20, 30, 50)
SHAPE = (144, 144, 12)
#: Targets of issue 11 at SNR 20-30: RMSE bayesian / better least squares, and coverage.
RATIO_TARGETS = {"f": 0.6, "D_star": 0.65, "D": 0.7}
COVERAGE_TARGET = (0.88, 0.995)
SPEED_TARGET = 100_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 slices, SNR 20 and 30 only")
    p.add_argument("--seed", type=int, default=1, help="phantom seed")
    p.add_argument("--spatial-only", action="store_true", help="the lesion-phantom part only")
    p.add_argument("--no-spatial", action="store_true", help="the tissue-phantom part only")
    return p.parse_args(argv)


def rmse(est, truth):
    """Root-mean-square error; a non-finite estimate counts as an infinite error."""
    e = np.asarray(est, dtype=np.float64) - truth
    e[~np.isfinite(e)] = np.inf
    return float(np.sqrt(np.mean(e**2)))


def coverage(est, sd, truth):
    """Share of voxels whose interval est +- 1.96 sd holds the truth (NaN counts as a miss)."""
    est = np.asarray(est, dtype=np.float64)
    sd = np.asarray(sd, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return float(np.mean(np.abs(est - truth) <= 1.96 * sd))


def timed_fit(ph, method):
    t0 = time.perf_counter()
    res = fastivim.fit_ivim(ph.signal, ph.b_values, mask=ph.mask, method=method)
    return res, ph.mask.sum() / (time.perf_counter() - t0)


def region_row(ph, fits, region, label, scheme, snr):
    """One table row: RMSE per method and parameter, ratios, coverage, over ``region``."""
    row = {"scheme": scheme, "snr": snr, "tissue": label, "n": int(region.sum())}
    truth = ph.truth()
    for p in PARAMS:
        t = truth[p][region]
        for m in METHODS:
            row[f"{p}_{m}"] = rmse(getattr(fits[m], p)[region], t)
        best_ls = min(row[f"{p}_segmented"], row[f"{p}_full"])
        row[f"{p}_ratio"] = row[f"{p}_bayesian"] / best_ls
        bay = fits["bayesian"]
        row[f"{p}_cover"] = coverage(getattr(bay, p)[region], getattr(bay, p + "_sd")[region], t)
    return row


def run_config(scheme, snr, shape, seed, say):
    ph = tissue_phantom(shape, b_values=B_SCHEMES[scheme], snr=snr, seed=seed)
    fits = {}
    speed = {}
    for m in METHODS:
        fits[m], speed[m] = timed_fit(ph, m)
    rows = [region_row(ph, fits, ph.mask, "pooled", scheme, snr)]
    rows[0].update({f"vox_s_{m}": speed[m] for m in METHODS})
    rows[0]["prior"] = fits["bayesian"].prior
    rows[0]["sigma_est"] = fits["bayesian"].noise_sigma
    rows[0]["sigma_true"] = ph.sigma
    for k, name in enumerate(ph.tissues, start=1):
        region = ph.labels == k
        if region.any():
            rows.append(region_row(ph, fits, region, name, scheme, snr))
    return rows


def table_columns(with_speed):
    cols = [("tissue", "tissue", None), ("n", "voxels", "d")]
    for p in PARAMS:
        for m, short in (("segmented", "seg"), ("full", "full"), ("bayesian", "bay")):
            cols.append((f"{p}_{m}_s", f"{p} {short}", ".3f"))
        cols.append((f"{p}_ratio", f"{p} ratio", ".2f"))
        cols.append((f"{p}_cover", f"{p} cov", ".3f"))
    if with_speed:
        cols += [(f"vox_s_{m}", f"vox/s {m}", ",.0f") for m in METHODS]
    return cols


def scaled(row):
    out = dict(row)
    for p, scale in (("D", 1e3), ("D_star", 1e3), ("f", 1.0)):
        for m in METHODS:
            out[f"{p}_{m}_s"] = row[f"{p}_{m}"] * scale
    return out


# ---------------------------------------------------------------- spatial (issue 17)
SP_METHODS = ("segmented", "full", "bayesian", "spatial")
#: b schemes of the spatial part: the clinical 11-b protocol and one with repeated b-values.
SP_SCHEMES = {
    "clinical11": B_SCHEMES["clinical11"],
    "repeated16": np.array([0, 0, 10, 20, 40, 60, 100, 100, 150, 200, 400, 400, 600, 600, 800,
                            800], dtype=np.float64),
}
SP_SNRS = (20, 30)
#: Targets of issue 17: pooled RMSE spatial / better least squares; per tissue spatial /
#: bayesian (f, D) within 5%; lesion contrast kept; coverage per tissue; speed.
SP_RATIO_TARGETS = {"f": 0.30, "D_star": 0.30, "D": 0.45}
SP_TISSUE_TARGET = 1.05
SP_LESION_TARGET = 0.75
SP_COVERAGE_TARGET = (0.85, 0.995)
SP_SPEED_TARGET = 50_000


def sp_fit(ph, method, repeats=1):
    """The fit, and its best wall and CPU seconds over ``repeats`` runs."""
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        res = fastivim.fit_ivim(ph.signal, ph.b_values, mask=ph.mask, method=method,
                                voxel_sizes=ph.voxel_size)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return res, min(wall), min(cpu)


def sp_config(scheme, snr, shape, seed):
    ph = lesion_phantom(shape, b_values=SP_SCHEMES[scheme], snr=snr, seed=seed)
    n = int(ph.mask.sum())
    fits, speed = {}, {}
    for m in SP_METHODS:
        reps = 2 if m in ("bayesian", "spatial") else 1
        fits[m], wall, cpu = sp_fit(ph, m, reps)
        speed[m] = (n / wall, n / cpu)
    truth = ph.truth()
    pooled = {"scheme": scheme, "snr": snr, "tissue": "pooled", "n": n}
    for p in PARAMS:
        t = truth[p][ph.mask]
        err = {m: rmse(getattr(fits[m], p)[ph.mask], t) for m in SP_METHODS}
        best_ls = min(err["segmented"], err["full"])
        pooled[f"{p}_ratio_spatial"] = err["spatial"] / best_ls
        pooled[f"{p}_ratio_bayesian"] = err["bayesian"] / best_ls
    for m in ("bayesian", "spatial"):
        pooled[f"vox_s_{m}"], pooled[f"vox_cpu_s_{m}"] = speed[m]
    for p in ("f", "D"):
        for m in SP_METHODS:
            kept = lesion_contrast(getattr(fits[m], p), truth[p], ph)
            pooled[f"lesion_{p}_{m}"] = float(np.median(kept))
        kept = lesion_contrast(getattr(fits["spatial"], p), truth[p], ph)
        pooled[f"lesion_{p}_spatial_min"] = float(np.min(kept))
    pooled["n_lesions"] = int(ph.lesions.max())
    rows = [pooled]
    for k, name in enumerate(ph.tissues, start=1):
        region = (ph.labels == k) & (ph.lesions == 0)
        if region.sum() < 20:
            continue
        row = {"scheme": scheme, "snr": snr, "tissue": name, "n": int(region.sum())}
        for p in PARAMS:
            t = truth[p][region]
            row[f"{p}_vs_bayesian"] = (rmse(getattr(fits["spatial"], p)[region], t)
                                       / rmse(getattr(fits["bayesian"], p)[region], t))
            sp = fits["spatial"]
            row[f"{p}_cover"] = coverage(getattr(sp, p)[region], getattr(sp, p + "_sd")[region],
                                         t)
        rows.append(row)
    les = ph.lesions > 0
    row = {"scheme": scheme, "snr": snr, "tissue": "lesions", "n": int(les.sum())}
    for p in PARAMS:
        t = truth[p][les]
        row[f"{p}_vs_bayesian"] = (rmse(getattr(fits["spatial"], p)[les], t)
                                   / rmse(getattr(fits["bayesian"], p)[les], t))
        sp = fits["spatial"]
        row[f"{p}_cover"] = coverage(getattr(sp, p)[les], getattr(sp, p + "_sd")[les], t)
    rows.append(row)
    return rows


def run_spatial_part(args, say):
    shape = (SHAPE[0], SHAPE[1], 2) if args.quick else SHAPE
    say(f"\nspatial method (issue 17): lesion phantom {shape}, 1.5 x 1.5 x 4 mm voxels, seed "
        f"{args.seed}; every body voxel counts (lesions included) in the pooled ratios; the "
        f"tissue rows leave the lesions out")
    warm = lesion_phantom((48, 48, 2), snr=20, seed=0)
    for m in SP_METHODS:
        fastivim.fit_ivim(warm.signal, warm.b_values, mask=warm.mask, method=m,
                          voxel_sizes=warm.voxel_size)
    all_rows = []
    for scheme in SP_SCHEMES:
        for snr in SP_SNRS:
            rows = sp_config(scheme, snr, shape, args.seed)
            all_rows += rows
            p0 = rows[0]
            say(f"\n{scheme} ({len(SP_SCHEMES[scheme])} b-values), SNR {snr}, {p0['n']:,} body "
                f"voxels, {p0['n_lesions']} lesions")
            say("  pooled RMSE / better least squares:  spatial  f {f:.2f}  D* {ds:.2f}  D {d:.2f}"
                "   (bayesian f {bf:.2f}  D* {bds:.2f}  D {bd:.2f})".format(
                    f=p0["f_ratio_spatial"], ds=p0["D_star_ratio_spatial"],
                    d=p0["D_ratio_spatial"], bf=p0["f_ratio_bayesian"],
                    bds=p0["D_star_ratio_bayesian"], bd=p0["D_ratio_bayesian"]))
            say("  lesion contrast kept (median over lesions), f / D:  " + ",  ".join(
                f"{m} {p0[f'lesion_f_{m}']:.2f} / {p0[f'lesion_D_{m}']:.2f}" for m in SP_METHODS)
                + f"  (spatial's smallest: {p0['lesion_f_spatial_min']:.2f} / "
                  f"{p0['lesion_D_spatial_min']:.2f})")
            say(f"  voxels/s (wall, best of 2; per CPU-s): bayesian {p0['vox_s_bayesian']:,.0f} "
                f"({p0['vox_cpu_s_bayesian']:,.0f}), spatial {p0['vox_s_spatial']:,.0f} "
                f"({p0['vox_cpu_s_spatial']:,.0f})")
            out = io.StringIO()
            cols = [("tissue", "tissue", None), ("n", "voxels", "d")]
            for p in PARAMS:
                cols.append((f"{p}_vs_bayesian", f"{p} sp/bay", ".2f"))
            for p in PARAMS:
                cols.append((f"{p}_cover", f"{p} cov", ".3f"))
            print_table(rows[1:], cols, file=out)
            say(out.getvalue().rstrip("\n"))
    say("\nsummary (spatial, issue 17 targets: pooled ratio "
        + ", ".join(f"{p} <= {t}" for p, t in SP_RATIO_TARGETS.items())
        + f"; tissue f, D vs bayesian <= {SP_TISSUE_TARGET}; lesion contrast >= "
          f"{SP_LESION_TARGET}; coverage f, D {SP_COVERAGE_TARGET[0]}-{SP_COVERAGE_TARGET[1]} "
          f"per tissue; >= {SP_SPEED_TARGET:,} vox/s)")
    for r in all_rows:
        if r["tissue"] != "pooled":
            continue
        tis = [x for x in all_rows if x["scheme"] == r["scheme"] and x["snr"] == r["snr"]
               and x["tissue"] not in ("pooled", "lesions")]
        worst_f = max(tis, key=lambda x: x["f_vs_bayesian"])
        worst_d = max(tis, key=lambda x: x["D_vs_bayesian"])
        cov = [x[f"{p}_cover"] for x in tis for p in ("f", "D")]
        say(f"  {r['scheme']:10s} SNR {r['snr']}: ratio f {r['f_ratio_spatial']:.2f} D* "
            f"{r['D_star_ratio_spatial']:.2f} D {r['D_ratio_spatial']:.2f}; worst tissue vs "
            f"bayesian f {worst_f['tissue']} {worst_f['f_vs_bayesian']:.2f}, D "
            f"{worst_d['tissue']} {worst_d['D_vs_bayesian']:.2f}; lesions f "
            f"{r['lesion_f_spatial']:.2f} D {r['lesion_D_spatial']:.2f}; coverage f, D over "
            f"tissues {min(cov):.3f}-{max(cov):.3f}; spatial {r['vox_s_spatial']:,.0f} vox/s, "
            f"bayesian {r['vox_s_bayesian']:,.0f}")
    return all_rows


def main(argv=None):
    args = parse_args(argv)
    if args.spatial_only:
        say, buf = tee_printer()
        meta = machine_info()
        meta.update(seed=args.seed, threads=numba.get_num_threads())
        say(f"fastivim {meta['fastivim']} spatial accuracy bench  {meta['date']}")
        say(f"{meta['cpu']}, {meta['cores']} cores; numba threads {numba.get_num_threads()}")
        rows = run_spatial_part(args, say)
        for path in write_outputs("accuracy_spatial", rows, meta, text=buf.getvalue()):
            print(f"wrote {path}")
        return
    say, buf = tee_printer()
    shape = (SHAPE[0], SHAPE[1], 2) if args.quick else SHAPE
    snrs = (20, 30) if args.quick else SNRS
    meta = machine_info()
    meta.update(shape=shape, snrs=snrs, seed=args.seed, threads=numba.get_num_threads())
    say(f"fastivim {meta['fastivim']} accuracy bench  {meta['date']}")
    say(f"{meta['cpu']}, {meta['cores']} cores; numba threads {numba.get_num_threads()}")
    say(f"tissue phantom {shape}, seed {args.seed}; RMSE against the truth over every body "
        f"voxel (D, D_star in 1e-3 mm²/s); ratio = bayesian / better least-squares method; "
        f"cov = share of voxels inside the Bayesian mean +- 1.96 SD")
    warm = tissue_phantom((48, 48, 1), snr=20, seed=0)
    for m in METHODS:  # compile / load the kernels outside the timings
        fastivim.fit_ivim(warm.signal, warm.b_values, mask=warm.mask, method=m)
    all_rows = []
    for scheme in B_SCHEMES:
        for snr in snrs:
            rows = run_config(scheme, snr, shape, args.seed, say)
            all_rows += rows
            pooled = rows[0]
            title = (f"\n{scheme} ({len(B_SCHEMES[scheme])} b-values), SNR {snr}: sigma "
                     f"estimated {pooled['sigma_est']:.2f} (true {pooled['sigma_true']:.2f}), "
                     f"prior {pooled['prior']}; voxels/s on {pooled['n']:,} body voxels: "
                     + ", ".join(f"{m} {pooled[f'vox_s_{m}']:,.0f}" for m in METHODS))
            out = io.StringIO()
            print_table([scaled(r) for r in rows], table_columns(False), title=title, file=out)
            say(out.getvalue().rstrip("\n"))
    say("\nsummary (pooled): ratio targets at SNR 20-30 "
        + ", ".join(f"{p} <= {t}" for p, t in RATIO_TARGETS.items())
        + f"; coverage {COVERAGE_TARGET[0]}-{COVERAGE_TARGET[1]}; >= {SPEED_TARGET:,} vox/s")
    for r in all_rows:
        if r["tissue"] != "pooled":
            continue
        worst = max((x for x in all_rows if x["scheme"] == r["scheme"] and x["snr"] == r["snr"]
                     and x["tissue"] != "pooled"), key=lambda x: x["D_star_ratio"])
        worst_d = max((x for x in all_rows if x["scheme"] == r["scheme"] and x["snr"] == r["snr"]
                       and x["tissue"] != "pooled"), key=lambda x: x["D_ratio"])
        say(f"  {r['scheme']:10s} SNR {r['snr']:2d}: ratio f {r['f_ratio']:.2f} D_star "
            f"{r['D_star_ratio']:.2f} D {r['D_ratio']:.2f}; cover D {r['D_cover']:.3f} D_star "
            f"{r['D_star_cover']:.3f} f {r['f_cover']:.3f}; bayesian {r['vox_s_bayesian']:,.0f}"
            f" vox/s; worst D_star: {worst['tissue']} ({worst['D_star_ratio']:.2f}), worst D: "
            f"{worst_d['tissue']} ({worst_d['D_ratio']:.2f})")
    for path in write_outputs("accuracy", all_rows, meta, text=buf.getvalue()):
        print(f"wrote {path}")
    if not args.no_spatial:
        say2, buf2 = tee_printer()
        rows = run_spatial_part(args, say2)
        for path in write_outputs("accuracy_spatial", rows, meta, text=buf2.getvalue()):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
