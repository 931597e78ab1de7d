"""End-to-end benchmark of ``fastivim run``: read, mask, fit and write time, separately.

    .venv/bin/python bench/bench_cli.py                       # 128x128x30x10 and 256x256x30x10
    .venv/bin/python bench/bench_cli.py --sizes 96x96x20 --repeat 5 --method full

For each size it writes a phantom ``.nii.gz`` (float32, 10 b-values, automatic mask keeps ~57%
of the voxels) under ``bench/out/``, then

1. runs the pipeline in-process (:func:`fastivim.io.fit_file`, what ``fastivim run`` calls)
   ``--repeat`` times after a compiling warm-up and prints the median of each stage;
2. runs the real command ``fastivim run X.nii.gz -q --overwrite`` as a subprocess once after a
   warm-up run, wall clock (interpreter start, imports and cache loading included);
3. times the fit alone with and without the progress bar (chunked fit), alternating, and
   prints the overhead in %;
4. times the map encoding at gzip level 1 (what fastivim writes) and 6 (nibabel's usual).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numba

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastivim import __version__, fit_ivim, io  # noqa: E402
from fastivim.methods import _blocks as fit_mod  # noqa: E402
from fastivim.model import maps_of  # noqa: E402
from fastivim.simulate import phantom  # noqa: E402

OUT = ROOT / "bench" / "out"


def parse_size(text):
    return tuple(int(v) for v in text.lower().split("x"))


def make_input(shape):
    path = OUT / f"dwi_{'x'.join(map(str, shape))}.nii.gz"
    if not path.exists():
        io.write_phantom(path, phantom(shape, snr=30, seed=0), overwrite=True)
    return path


def stage_times(path, method, repeat):
    rows = []
    for _ in range(repeat):
        rec = io.fit_file(path, method=method, out_dir=OUT / f"{io.image_stem(path)}_ivim",
                          overwrite=True, command="bench")
        rows.append(rec)
    med = {k: statistics.median(r["timings"][k] for r in rows)
           for k in ("read", "mask", "fit", "write", "total")}
    return med, rows[-1]["voxels"]["fitted"]


def command_wall(path, method):
    exe = Path(sys.executable).with_name("fastivim")
    cmd = [str(exe), "run", str(path), "-q", "--overwrite", "--method", method,
           "-o", str(OUT / f"{io.image_stem(path)}_cmd")]
    subprocess.run(cmd, check=True, capture_output=True)  # warm: numba cache, page cache
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def progress_overhead(path, method, repeat):
    d = io.load_dwi(path)
    mask, _ = io.auto_mask(d.data, d.b_values)
    t_plain, t_bar = [], []
    devnull = open(os.devnull, "w")
    real_stderr = sys.stderr
    for _ in range(repeat):
        for bar, bucket in ((False, t_plain), (True, t_bar)):
            sys.stderr = devnull if bar else real_stderr  # the bar's drawing goes nowhere
            t = time.perf_counter()
            fit_ivim(d.data, d.b_values, mask=mask, method=method, progress=bar)
            bucket.append(time.perf_counter() - t)
            sys.stderr = real_stderr
    plain, barred = min(t_plain), min(t_bar)
    return plain, barred, 100.0 * (barred / plain - 1.0)


def gzip_levels(path):
    d = io.load_dwi(path)
    res = fit_ivim(d.data[:, :, :4], d.b_values)  # a few slices are enough to compare levels
    imgs = [io.map_image(getattr(res, s.attr), d.img.slicer[:, :, :4], s.dtype)
            for s in maps_of(res)]  # the maps this fit holds (no uncertainty maps here)
    out = {}
    for level in (1, 6):
        t = time.perf_counter()
        size = sum(len(io.nifti_bytes(img, level)) for img in imgs)
        out[level] = (time.perf_counter() - t, size)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["128x128x30", "256x256x30"])
    ap.add_argument("--method", default="segmented", choices=["segmented", "full"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-command", action="store_true", help="skip the subprocess timing")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    warm = make_input((16, 16, 4))
    io.fit_file(warm, method=args.method, out_dir=OUT / "warm_ivim", overwrite=True)

    print(f"fastivim {__version__} end-to-end, method={args.method}, "
          f"numba threads={numba.get_num_threads()}, cpus={os.cpu_count()}, "
          f"median of {args.repeat} in-process runs (s)")
    print("| size (x,y,z,b) | file MB | voxels fitted | read | mask | fit | write | total "
          "| (read+write)/fit | voxels/s (total) | `fastivim run` wall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        shape = parse_size(size)
        path = make_input(shape)
        med, n = stage_times(path, args.method, args.repeat)
        wall = float("nan") if args.no_command else command_wall(path, args.method)
        mb = path.stat().st_size / 1e6
        print(f"| {size}x10 | {mb:.1f} | {n:,} | {med['read']:.3f} | {med['mask']:.3f} "
              f"| {med['fit']:.3f} | {med['write']:.3f} | {med['total']:.3f} "
              f"| {(med['read'] + med['write']) / med['fit']:.2f} | {n / med['total']:,.0f} "
              f"| {wall:.2f} |")

    path = make_input(parse_size(args.sizes[0]))
    plain, barred, pct = progress_overhead(path, args.method, max(args.repeat, 3))
    print(f"\nprogress bar ({args.sizes[0]}, best of {max(args.repeat, 3)}): fit without bar "
          f"{plain:.3f} s, with bar (blocks of about {fit_mod.BLOCK_SECONDS:g} s; the fit runs "
          f"in such blocks with or without it) {barred:.3f} s: "
          f"overhead {pct:+.1f}%")
    levels = gzip_levels(path)
    print("gzip of the 8 maps of 4 slices: " + ", ".join(
        f"level {lv}: {t * 1e3:.0f} ms, {sz / 1e6:.2f} MB" for lv, (t, sz) in levels.items()))


if __name__ == "__main__":
    main()
