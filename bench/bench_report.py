"""How long the quality-control report takes, and the README thumbnail.

Usage::

    python bench/bench_report.py                      # 128×128×30 phantom, 10 b-values
    python bench/bench_report.py --shape 64,64,10 --repeat 3
    python bench/bench_report.py --run-dir OUT_DIR    # time an existing `fastivim run` output
    python bench/bench_report.py --shape 64,64,10 --thumbnail docs/report_thumbnail.png

Simulates a phantom (:func:`fastivim.simulate.phantom`, SNR 30), writes it as NIfTI, fits it as
``fastivim run`` does (:func:`fastivim.io.fit_file`, not timed), then times
:func:`fastivim.report.report_from_output` end to end (read the maps and the DWI, draw, write)
and each figure on its own. Prints one table; the first report of a process also pays the
matplotlib import, shown separately.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _shape(text):
    return tuple(int(v) for v in text.split(","))


def thumbnail(pngs, target, width_px=900):
    """One small PNG: the maps on the left, histograms over decay curves on the right."""
    from matplotlib import image as mimg
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps, hist, decay = (mimg.imread(p) for p in pngs)
    # right column width = maps height scaled; solve for a common height
    r_h = hist.shape[0] / hist.shape[1] + decay.shape[0] / decay.shape[1]  # per unit width
    m_ratio = maps.shape[1] / maps.shape[0]  # width per unit height
    height = 1.0
    w_right = height / r_h
    w_maps = height * m_ratio
    total_w = w_maps + w_right
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, width_px / dpi * height / total_w), dpi=dpi)
    FigureCanvasAgg(fig)
    fw = total_w
    fig.add_axes([0, 0, w_maps / fw, 1]).imshow(maps, interpolation="lanczos")
    h_hist = (hist.shape[0] / hist.shape[1]) * w_right
    fig.add_axes([w_maps / fw, 1 - h_hist, w_right / fw, h_hist]).imshow(
        hist, interpolation="lanczos")
    fig.add_axes([w_maps / fw, 0, w_right / fw, 1 - h_hist]).imshow(
        decay, interpolation="lanczos")
    for ax in fig.axes:
        ax.set_axis_off()
    canvas = fig.canvas
    canvas.draw()
    from PIL import Image  # a matplotlib dependency

    img = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    # 256-colour palette: noisy maps compress badly as true colour (README size budget)
    img.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        target, optimize=True)
    return Path(target)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=_shape, default=(128, 128, 30), help="X,Y,Z")
    ap.add_argument("--repeat", type=int, default=3, help="timed reports (best and median)")
    ap.add_argument("--run-dir", type=Path, help="time this existing run output instead")
    ap.add_argument("--work", type=Path, help="folder for the phantom and its fit "
                                              "(default: a temporary one)")
    ap.add_argument("--thumbnail", type=Path, help="also write the README thumbnail here")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    import matplotlib  # noqa: F401  (first import: font cache, counted apart)

    t_import = time.perf_counter() - t
    import numba

    from fastivim import io, report
    from fastivim.simulate import DEFAULT_B_VALUES, phantom

    work = args.work or Path(tempfile.mkdtemp(prefix="fastivim-bench-report-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.run_dir is None:
        dwi = work / "phantom.nii.gz"
        out_dir = work / "phantom_ivim"
        if not (out_dir / "fastivim.json").is_file():
            io.write_phantom(dwi, phantom(args.shape, DEFAULT_B_VALUES, snr=30.0, seed=0),
                             overwrite=True)
            io.fit_file(dwi, out_dir=out_dir, overwrite=True)
    else:
        out_dir = args.run_dir
    res, record, zooms = report.load_output(out_dir)
    shape = "×".join(map(str, res.shape))
    n_b = len(record["b_values"])

    times = []
    for _ in range(max(1, args.repeat)):
        t = time.perf_counter()
        html = report.report_from_output(out_dir)
        times.append(time.perf_counter() - t)

    t = time.perf_counter()
    res, record, zooms = report.load_output(out_dir)
    t_maps = time.perf_counter() - t
    t = time.perf_counter()
    d = io.load_dwi(record["input"], bvals=res.b_values)
    t_dwi = time.perf_counter() - t
    parts = {}
    for name, fn in (("maps", lambda: report.plot_maps(res, voxel_size=zooms)),
                     ("histograms", lambda: report.plot_histograms(res)),
                     ("decay", lambda: report.plot_decay(res, d))):
        t = time.perf_counter()
        fig = fn()
        t_draw = time.perf_counter() - t
        t = time.perf_counter()
        report.figure_png(fig)
        parts[name] = (t_draw, time.perf_counter() - t)

    times.sort()
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = float("nan")
    print(f"fastivim report of a {shape} volume, {n_b} b-values "
          f"({int(res.quality_mask.sum()):,} quality voxels), {out_dir}")
    print(f"  machine: {os.cpu_count()} CPUs, load average {load:.1f}; numba threads "
          f"{numba.get_num_threads()}")
    print(f"  {'report_from_output (end to end)':<36}best {times[0]:6.2f} s   median "
          f"{times[len(times) // 2]:6.2f} s   ({len(times)} runs)")
    print(f"  {'  read the 8 maps':<36}{t_maps:6.2f} s")
    print(f"  {'  read the DWI':<36}{t_dwi:6.2f} s")
    for name, (a, b) in parts.items():
        print(f"  {'  figure ' + name:<36}{a:6.2f} s build + {b:5.2f} s PNG")
    print(f"  {'matplotlib import (first report)':<36}{t_import:6.2f} s")
    print(f"  report: {html}")
    if args.thumbnail is not None:
        args.thumbnail.parent.mkdir(parents=True, exist_ok=True)
        pngs = [out_dir / report.REPORT_FILES[k] for k in ("maps", "histograms", "decay")]
        p = thumbnail(pngs, args.thumbnail)
        print(f"  thumbnail: {p} ({p.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
