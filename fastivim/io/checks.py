"""Checks of input files from other software, made before any data is read or any work done.

A NIfTI header is a promise about the data that follows it, and files from other software break
it: complex or RGB data where IVIM needs one real number per sample, dimensions that are
negative or far larger than the file could hold (a 41 KB ``.nii.gz`` that declares 400³×10
voxels), a NaN in the affine. Each check raises :class:`InputError` with one line naming the
file; none reads the data array, so a lying header costs nothing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


class InputError(ValueError):
    """An input file or value that cannot be used; the message names the file."""


#: gzip (deflate) cannot compress better than about 1032:1, so a ``.nii.gz`` of N bytes holds at
#: most this many times N bytes of image.
GZIP_MAX_RATIO = 1032

#: Reading converts the data to float32 and the fit needs about as much again: refuse images
#: whose float32 size times this exceeds the memory available.
MEMORY_FACTOR = 2.0


def _human(n_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n_bytes < 1000 or unit == "PB":
            return f"{n_bytes:.3g} {unit}" if unit != "bytes" else f"{int(n_bytes)} bytes"
        n_bytes /= 1000
    return f"{n_bytes:.3g} PB"  # pragma: no cover


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def declared_shape(header, path: Path) -> tuple:
    """The image shape the header declares, refusing dimensions no image can have."""
    dim = [int(d) for d in header["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise InputError(f"{path}: header declares {ndim} dimensions (a NIfTI image has 1 to 7)")
    shape = tuple(dim[1:ndim + 1])
    for axis, n in enumerate(shape, start=1):
        if n < 1:
            raise InputError(f"{path}: header declares dimension {axis} = {n} (not a valid "
                             f"image size; the file is damaged or not written by a NIfTI tool)")
    return shape


def check_data_type(dtype: np.dtype, path: Path) -> None:
    """Refuse data that is not one real number per voxel and volume."""
    if dtype.kind == "c":
        raise InputError(f"{path}: complex data ({dtype}); IVIM fits magnitude images: take the "
                         f"magnitude (abs) of the complex image first")
    if dtype.kind == "V" or dtype.fields:
        raise InputError(f"{path}: RGB or structured data ({dtype}); IVIM needs one real number "
                         f"per voxel and volume")
    if dtype.kind not in "biuf":
        raise InputError(f"{path}: data type {dtype} is not a number type")


def check_data_size(shape: tuple, dtype: np.dtype, offset: int, path: Path) -> None:
    """Refuse a header whose declared data cannot be in the file, or cannot fit in memory."""
    n_values = math.prod(shape)
    declared = n_values * dtype.itemsize
    size = path.stat().st_size
    dims = "×".join(map(str, shape))
    if path.name.endswith(".gz"):
        most = size * GZIP_MAX_RATIO
        if declared > most:
            raise InputError(
                f"{path}: header declares {dims} voxels ({_human(declared)}) but the file holds "
                f"{_human(size)} compressed, at most {_human(most)} of data: the header is wrong "
                f"or the file is truncated")
    elif size < offset + declared:
        raise InputError(
            f"{path}: header declares {dims} voxels ({_human(declared)}) but the file holds "
            f"{_human(max(size - offset, 0))} of data: the header is wrong or the file is "
            f"truncated")
    need = n_values * 4 * MEMORY_FACTOR
    avail = available_memory()
    if avail is not None and need > avail:
        raise InputError(f"{path}: {dims} voxels need about {_human(need)} of memory to fit, "
                         f"{_human(avail)} is available")


def check_affine(img, path: Path) -> None:
    """Refuse a voxel-to-world mapping with NaN or inf (maps could not be placed in space)."""
    try:
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises several types for a broken qform
        raise InputError(f"{path}: unusable affine (voxel-to-world mapping): {exc}") from None
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: the affine (voxel-to-world mapping, sform/qform) contains NaN "
                         f"or inf; fix the header (e.g. with fslorient or nibabel) first")
    if abs(np.linalg.det(affine[:3, :3])) == 0.0:
        raise InputError(f"{path}: the affine (voxel-to-world mapping) is singular (a zero voxel "
                         f"size); fix the header first")


def check_nifti(img, path: Path) -> None:
    """All the header checks above, for an image that :func:`nibabel.load` opened."""
    header = img.header
    shape = declared_shape(header, path)
    dtype = header.get_data_dtype()
    check_data_type(dtype, path)
    offset = int(getattr(header, "get_data_offset", lambda: 0)() or 0)
    check_data_size(shape, dtype, offset, path)
    check_affine(img, path)


def check_bvecs(v: np.ndarray, path: Path) -> None:
    """Refuse gradient directions with NaN or inf (they are recorded in every sidecar)."""
    if not np.all(np.isfinite(v)):
        raise InputError(f"{path}: b-vectors contain NaN or inf")
