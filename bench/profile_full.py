"""Where a ``full`` voxel's time goes: the block kernel's stages, timed with the CPU's cycle
counter, on one thread.

    .venv/bin/python bench/profile_full.py                  # 40,960 voxels at SNR 30
    .venv/bin/python bench/profile_full.py --snr 20 --n 20480 --src /tmp/base

The kernel has no timers (they would cost time): this script copies the checkout's sources
(``--src``, default this one) to a temporary folder, inserts ``llvm.readcyclecounter`` reads
around the stages of ``full_block`` and of the LM engine's round (refill, evaluate, accept,
step, end of round), and runs the copy in a fresh process with its own numba cache (about
20 s of compile). It stops with an error when the sources no longer have the expected shape.
Printed: TSC ticks per voxel and share of the kernel's time per stage (best of ``--reps``
runs), and per voxel the LM rounds, lane evaluations (active lanes per round), LM runs and
``lanes_step`` passes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RDTSC = '''
from numba.extending import intrinsic as _intrinsic
from numba import types as _types


@_intrinsic
def _tsc(typingctx):
    def codegen(context, builder, signature, args):
        from llvmlite import ir
        fn = builder.module.declare_intrinsic("llvm.readcyclecounter",
                                              fnty=ir.FunctionType(ir.IntType(64), []))
        return builder.call(fn, [])
    return _types.int64(), codegen
'''

#: (old, new) source edits of fastivim/kernels/block.py; each old text must occur once.
#: TM (16,) per chunk: 0 front, 1 grid, 2 block_restarts, 3 finish, 4 refill, 5 evaluate,
#: 6 accept, 7 step, 8 end of round, 10 rounds, 11 active lanes, 12 step passes, 13 runs.
EDITS = [
    ("from .vmath import vexp, vmax, vmin\n", "from .vmath import vexp, vmax, vmin\n" + RDTSC),
    ("def full_block(Y, v0, nl, t, settings, s, out, status):",
     "def full_block(Y, v0, nl, t, settings, s, out, status, TM):"),
    ("    _front(Y, v0, nl, t, settings, s)\n    block_grid_start(",
     "    T = _tsc()\n    _front(Y, v0, nl, t, settings, s)\n    TM[0] += _tsc() - T\n"
     "    T = _tsc()\n    block_grid_start("),
    ("                     s.GD, s.GK)\n    for restarts in (False, True):\n"
     "        if restarts:\n",
     "                     s.GD, s.GK)\n    TM[1] += _tsc() - T\n"
     "    for restarts in (False, True):\n        if restarts:\n            T = _tsc()\n"),
    ("                           s.ACC[4], s.KG, s.K0, s.K1, s.K2)\n",
     "                           s.ACC[4], s.KG, s.K0, s.K1, s.K2)\n"
     "            TM[2] += _tsc() - T\n"),
    ("                   s.LIT, s.LPH, s.LEND, s.LSTEP, s.LTAKE, s.LACC, s.LSLOT)\n",
     "                   s.LIT, s.LPH, s.LEND, s.LSTEP, s.LTAKE, s.LACC, s.LSLOT, TM)\n"
     "    T = _tsc()\n"),
    ("                 s.ACC[2], out, status)\n\n\n@jit_voxel\ndef _lm_engine(",
     "                 s.ACC[2], out, status)\n    TM[3] += _tsc() - T\n\n\n"
     "@jit_voxel\ndef _lm_engine("),
    ("               LSTEP, LTAKE, LACC, LSLOT):\n",
     "               LSTEP, LTAKE, LACC, LSLOT, TM):\n"),
    ("    while True:  # one pass per lock-step round\n        active = 0\n",
     "    while True:  # one pass per lock-step round\n        T0 = _tsc()\n"
     "        active = 0\n"),
    ("                    LPH[lane] = INIT\n",
     "                    LPH[lane] = INIT\n                    TM[13] += 1\n"),
    ("        if active == 0:\n            break\n"
     "        lanes_evaluate(bu, w, EP, YL, MT, GT, HT, ST)\n",
     "        if active == 0:\n            break\n        TM[10] += 1\n"
     "        TM[11] += active\n        T1 = _tsc()\n        TM[4] += T1 - T0\n"
     "        lanes_evaluate(bu, w, EP, YL, MT, GT, HT, ST)\n        T2 = _tsc()\n"
     "        TM[5] += T2 - T1\n"),
    ("                     LSTEP, LTAKE, LACC)\n",
     "                     LSTEP, LTAKE, LACC)\n        T3 = _tsc()\n"
     "        TM[6] += T3 - T2\n        TM[12] += 1\n"),
    ("                         LPRED, LPH, EP, LPT, LTAKE) >= RETRY_PASS_MIN:\n"
     "            pass\n",
     "                         LPRED, LPH, EP, LPT, LTAKE) >= RETRY_PASS_MIN:\n"
     "            TM[12] += 1\n        T4 = _tsc()\n        TM[7] += T4 - T3\n"),
    ("            LPH[lane] = HELD\n            LEND[lane] = RUNNING\n",
     "            LPH[lane] = HELD\n            LEND[lane] = RUNNING\n"
     "        TM[8] += _tsc() - T4\n"),
    ("    for v0 in range(start, stop, BLOCK):\n        full_block(Y, v0, min(BLOCK, "
     "stop - v0), tables, settings, s, out, status)\n",
     "    TM = np.zeros(16)\n    for v0 in range(start, stop, BLOCK):\n"
     "        full_block(Y, v0, min(BLOCK, stop - v0), tables, settings, s, out, status, TM)\n"
     "    for i in range(16):\n        out[start + i, 0] = TM[i]\n"),
]

CHILD = r"""
import sys, time, numpy as np, numba
import fastivim
from fastivim.kernels.block import fit_full_blocks
from fastivim.kernels.tables import METHOD_FULL, make_settings, make_tables
from fastivim.methods.least_squares import MAX_ITERATIONS
from fastivim.model import DEFAULT_BOUNDS, bounds_array
numba.set_num_threads(1)
n, snr, reps = {n}, {snr}, {reps}
ph = fastivim.simulate.phantom((n,), snr=snr, seed=0)
Y = np.ascontiguousarray(ph.signal, dtype=np.float64)
t = make_tables(ph.b_values, bounds_array(DEFAULT_BOUNDS))
s = make_settings(METHOD_FULL, 200.0, MAX_ITERATIONS)
out = np.empty((n, 6), np.float32); st = np.empty(n, np.uint8)
fit_full_blocks(Y[:2000], t, s, 1, out[:2000], st[:2000])
best = None
for _ in range(reps):
    fit_full_blocks(Y, t, s, 1, out, st)  # one chunk: its timers land in out[:16, 0]
    TM = out[:16, 0].astype(float)
    if best is None or TM[:9].sum() < best[:9].sum():
        best = TM
print(" ".join(repr(float(x)) for x in best))
"""

STAGES = [(0, "front (group means .. perfusion start)"), (1, "grid start"),
          (4, "LM: refill lanes (start choice)"), (5, "LM: lanes_evaluate"),
          (6, "LM: lanes_accept"), (7, "LM: lanes_step (+ retry passes)"),
          (8, "LM: end of round (keep best)"), (2, "block_restarts (profiles)"),
          (3, "block_finish")]


def patched_copy(src: Path, dest: Path) -> None:
    shutil.copytree(src / "fastivim", dest / "fastivim",
                    ignore=shutil.ignore_patterns("__pycache__"))
    path = dest / "fastivim" / "kernels" / "block.py"
    text = path.read_text()
    for old, new in EDITS:
        if text.count(old) != 1:
            sys.exit(f"profile_full: {path.relative_to(dest)} no longer has this text once "
                     f"(update EDITS):\n{old}")
        text = text.replace(old, new)
    path.write_text(text)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=str(ROOT), help="checkout to profile")
    p.add_argument("--n", type=int, default=40960, help="voxels (one chunk, one thread)")
    p.add_argument("--snr", type=float, default=30.0)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        patched_copy(Path(a.src), Path(tmp))
        env = dict(os.environ, PYTHONPATH=tmp, NUMBA_CACHE_DIR=str(Path(tmp) / "cache"))
        res = subprocess.run([sys.executable, "-c", CHILD.format(n=a.n, snr=a.snr, reps=a.reps)],
                             env=env, capture_output=True, text=True, cwd=tmp)
        if res.returncode:
            sys.exit(res.stderr)
    TM = [float(x) for x in res.stdout.split()]
    n = a.n
    total = sum(TM[i] for i, _ in STAGES)
    print(f"full method, {n:,} voxels at SNR {a.snr:g}, 1 thread, best of {a.reps}: "
          f"{total / n:,.0f} TSC ticks per voxel ({a.src})")
    print(f"{'stage':<42}{'ticks/voxel':>12}{'share':>8}")
    for i, name in STAGES:
        print(f"{name:<42}{TM[i] / n:>12,.0f}{100 * TM[i] / total:>7.1f}%")
    print(f"per voxel: {TM[10] / n:.3f} LM rounds, {TM[11] / n:.2f} lane slots in use "
          f"(runs and lanes waiting to retry; {TM[11] / max(TM[10], 1):.1f} of 16 a round), "
          f"{TM[13] / n:.2f} LM runs, "
          f"{TM[12] / n:.3f} lanes_step passes")


if __name__ == "__main__":
    main()
