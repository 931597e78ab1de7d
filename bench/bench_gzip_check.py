"""Cost of checking the gzip stream of a .nii.gz to its end (CRC-32 and length, issue 16).

Reads a 128×128×30×10 float32 phantom (``fastivim simulate``, level-1 gzip) the way fastivim did
before (nibabel's own proxy, which stops at the end of the data) and the way it does now
(:func:`fastivim.io.read._read_data`: one gzip stream read through to its trailer), alternating,
and prints CPU and wall time per read. Usage: ``python bench/bench_gzip_check.py [REPEATS]``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from fastivim.io import write_phantom
from fastivim.io.read import _read_data
from fastivim.simulate import DEFAULT_B_VALUES, phantom


def main(repeats: int = 7) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large.nii.gz"
        write_phantom(path, phantom((128, 128, 30), np.array(DEFAULT_B_VALUES), seed=5))
        times = {"nibabel, unchecked": [], "fastivim, CRC checked": []}
        for _ in range(repeats):
            for name in times:
                img = nib.load(path)
                c0, w0 = time.process_time(), time.perf_counter()
                data = np.asanyarray(img.dataobj) if name.startswith("nibabel") else \
                    _read_data(img, path)
                times[name].append((time.process_time() - c0, time.perf_counter() - w0))
                assert data.shape == (128, 128, 30, 10)
        size = path.stat().st_size / 1e6
        print(f"128x128x30x10 float32 ({128 * 128 * 30 * 10 * 4 / 1e6:.1f} MB), "
              f"{size:.1f} MB gzip; median of {repeats}")
        print(f"{'read':<24}{'CPU s':>8}{'wall s':>8}")
        for name, t in times.items():
            print(f"{name:<24}{statistics.median(c for c, _ in t):8.3f}"
                  f"{statistics.median(w for _, w in t):8.3f}")
        base = statistics.median(c for c, _ in times["nibabel, unchecked"])
        new = statistics.median(c for c, _ in times["fastivim, CRC checked"])
        print(f"ratio (CPU): {new / base:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
