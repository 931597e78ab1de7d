"""Running a compiled kernel over a (n_vox, n_b) matrix in blocks, with an optional progress bar.

Every kernel takes its signal matrix as float64, so that one compile serves every input dtype
(float64 from ``get_fdata()``, float32, int16): :func:`run_in_float64_blocks` hands each block
to the kernel as float64, a view of float64 input or an exact copy of float32 input into a
buffer of at most :data:`CONVERT_ROWS` rows (reused), so a float32 matrix is never doubled.

Python handles Ctrl-C only between calls into compiled code, and the progress bar moves once
per block. Each block is sized from the previous one's speed to take about
:data:`BLOCK_SECONDS`, so Ctrl-C is honoured within about that long on any method and thread
count, while fast fits get large blocks (each call costs a little: at a fixed 2**17 voxels
about 1% of throughput, at 2**15 about 7%).
"""

from __future__ import annotations

import time

import numpy as np

#: Target duration of one block, seconds.
BLOCK_SECONDS = 0.25

#: Voxels of the first block, and the smallest and largest block.
PROGRESS_CHUNK = 1 << 15
MAX_BLOCK = 1 << 21

#: Rows of a float32 (or read-only) matrix converted to float64 per kernel call: 10.5 MB at
#: 10 b-values, against 2**21 rows (168 MB) if blocks of float64 input were copied.
CONVERT_ROWS = 1 << 17


def float64_rows(Y, a: int, z: int, buf=None):
    """Rows ``a:z`` of ``Y`` (n_vox, n_b) as a C-contiguous, writeable float64 array.

    Writeable C-contiguous float64 input gives a view (no copy); anything else (float32,
    read-only) is converted exactly into ``buf`` (at least ``z - a`` rows) or a new array. The
    kernels read every sample as float64 anyway, so the answers are the same bits either way.
    """
    if _passes_as_is(Y):
        return Y[a:z]
    if buf is None or buf.shape[0] < z - a:
        return np.array(Y[a:z], dtype=np.float64, order="C")
    out = buf[:z - a]
    np.copyto(out, Y[a:z])
    return out


def _passes_as_is(Y) -> bool:
    # read-only arrays would be typed (and compiled) apart by numba
    return Y.dtype == np.float64 and Y.flags.c_contiguous and Y.flags.writeable


def convert_rows(Y) -> int:
    """Most rows of ``Y`` that one kernel call should take (all of them when passed as is)."""
    return max(Y.shape[0], 1) if _passes_as_is(Y) else CONVERT_ROWS


def convert_buffer(Y, rows: int):
    """Scratch of ``min(rows, n_vox)`` float64 rows for :func:`float64_rows` (None when ``Y``
    is passed as is)."""
    if _passes_as_is(Y):
        return None
    return np.empty((min(rows, Y.shape[0]), Y.shape[1]), dtype=np.float64)


def run_in_float64_blocks(Y, fit_block, progress: bool) -> None:
    """:func:`run_in_blocks` over the rows of ``Y``, calling ``fit_block(a, z, Y64)`` with
    ``Y64`` rows ``a:z`` of ``Y`` as float64 (:func:`float64_rows`)."""
    most = convert_rows(Y)
    buf = convert_buffer(Y, min(most, MAX_BLOCK))

    def call(a, z):
        fit_block(a, z, float64_rows(Y, a, z, buf))

    run_in_blocks(Y.shape[0], call, progress, most)


def run_in_blocks(n: int, fit_block, progress: bool, max_rows: int = MAX_BLOCK) -> None:
    """Call ``fit_block(a, z)`` on consecutive row ranges covering ``range(n)``, each at most
    ``max_rows`` long.

    Every voxel's result must not depend on the block it falls in (all kernels fit rows
    independently; the tests compare block and whole-matrix runs bit for bit).
    """
    bar = None
    if progress:
        from tqdm.auto import tqdm  # lazy: pipelines that never ask for a bar never import it

        bar = tqdm(total=n, unit="vox", unit_scale=True, desc="fitting", leave=False)
    try:
        a, block = 0, PROGRESS_CHUNK
        while a < n:  # blocks: an interrupt waits for one block at most
            z = min(a + min(block, max_rows), n)
            t0 = time.perf_counter()
            fit_block(a, z)
            rate = (z - a) / max(time.perf_counter() - t0, 1e-6)
            block = int(min(max(rate * BLOCK_SECONDS, PROGRESS_CHUNK), MAX_BLOCK))
            if bar is not None:
                bar.update(z - a)
            a = z
    finally:
        if bar is not None:
            bar.close()
