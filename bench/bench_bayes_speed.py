"""Speed of ``method="bayesian"`` per CPU-second and per wall-second (issue 11's speed target).

On the 144 x 144 x 12 tissue phantom of ``bench/bench_accuracy.py`` (139,248 body voxels), for
each b scheme and SNR: voxels per second of wall time and per CPU-second of this process (noise
estimate, EM prior and posteriors included; JIT excluded by a warm-up), best of ``--repeats``.
On a machine shared with other jobs the wall-time figure follows the load; the CPU-second
figure on one thread (``--threads 1``) does much less, which makes it the one to compare
versions by. (With more threads it also counts the time the OpenMP workers spin at barriers.)

Run::

    .venv/bin/python bench/bench_bayes_speed.py --threads 1
    .venv/bin/python bench/bench_bayes_speed.py --threads 2

Writes ``bench/out/bayes_speed_<threads>t.{csv,json,txt}``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numba

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, print_table, tee_printer, write_outputs  # noqa: E402

import fastivim  # noqa: E402
from fastivim.simulate import B_SCHEMES, tissue_phantom  # noqa: E402

SNRS = (10, 20, 30, 50)
SHAPE = (144, 144, 12)
#: A small mask in the same volume (issue 17): the body between columns 60 and 81, 31,968
#: voxels, where the EM prior's fixed cost weighs most.
SMALL_COLUMNS = (60, 82)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=numba.get_num_threads(),
                   help="numba threads (default: numba's default)")
    p.add_argument("--repeats", type=int, default=3, help="fits per configuration")
    p.add_argument("--seed", type=int, default=1, help="phantom seed")
    return p.parse_args(argv)


def small_mask(ph):
    """The body between :data:`SMALL_COLUMNS` of the second axis."""
    m = ph.mask.copy()
    m[:, :SMALL_COLUMNS[0]] = False
    m[:, SMALL_COLUMNS[1]:] = False
    return m


def measure(ph, repeats, mask=None):
    """Best (wall seconds, CPU seconds) of ``repeats`` Bayesian fits of the phantom."""
    wall, cpu = [], []
    mask = ph.mask if mask is None else mask
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fastivim.fit_ivim(ph.signal, ph.b_values, mask=mask, method="bayesian")
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def main(argv=None):
    args = parse_args(argv)
    numba.set_num_threads(args.threads)
    say, buf = tee_printer()
    meta = machine_info()
    meta.update(shape=SHAPE, snrs=SNRS, seed=args.seed, threads=args.threads,
                repeats=args.repeats)
    say(f"fastivim {meta['fastivim']} bayesian speed  {meta['date']}")
    say(f"{meta['cpu']}, {meta['cores']} cores; numba threads {args.threads}; tissue phantom "
        f"{SHAPE}, seed {args.seed}; best of {args.repeats}")
    warm = tissue_phantom((48, 48, 1), snr=20, seed=0)
    fastivim.fit_ivim(warm.signal, warm.b_values, mask=warm.mask, method="bayesian")
    rows = []
    for scheme in B_SCHEMES:
        for snr in SNRS:
            ph = tissue_phantom(SHAPE, b_values=B_SCHEMES[scheme], snr=snr, seed=args.seed)
            n = int(ph.mask.sum())
            wall, cpu = measure(ph, args.repeats)
            rows.append({"scheme": scheme, "snr": snr, "voxels": n, "vox_per_s": n / wall,
                         "vox_per_cpu_s": n / cpu})
            small = small_mask(ph)
            n = int(small.sum())
            wall, cpu = measure(ph, args.repeats, small)
            rows.append({"scheme": scheme, "snr": snr, "voxels": n, "vox_per_s": n / wall,
                         "vox_per_cpu_s": n / cpu})
    out = io.StringIO()
    print_table(rows, [("scheme", "scheme", None), ("snr", "SNR", "d"), ("voxels", "voxels", "d"),
                       ("vox_per_s", "voxels/s", ",.0f"),
                       ("vox_per_cpu_s", "voxels per CPU-s", ",.0f")], file=out)
    say(out.getvalue().rstrip("\n"))
    for path in write_outputs(f"bayes_speed_{args.threads}t", rows, meta, text=buf.getvalue()):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
