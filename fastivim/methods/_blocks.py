"""Running a compiled kernel over a (n_vox, n_b) matrix in blocks, with an optional progress bar.

Python handles Ctrl-C only between calls into compiled code, and the progress bar moves once
per block. Each block is sized from the previous one's speed to take about
:data:`BLOCK_SECONDS`, so Ctrl-C is honoured within about that long on any method and thread
count, while fast fits get large blocks (each call costs a little: at a fixed 2**17 voxels
about 1% of throughput, at 2**15 about 7%).
"""

from __future__ import annotations

import time

#: Target duration of one block, seconds.
BLOCK_SECONDS = 0.25

#: Voxels of the first block, and the smallest and largest block.
PROGRESS_CHUNK = 1 << 15
MAX_BLOCK = 1 << 21


def run_in_blocks(n: int, fit_block, progress: bool) -> None:
    """Call ``fit_block(a, z)`` on consecutive row ranges covering ``range(n)``.

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
            z = min(a + block, n)
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
