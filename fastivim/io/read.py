"""Reading: a 4D DWI series and its b-values, gradient directions and masks; a run's maps back.

Every function raises :class:`InputError` with a one-line message that names the file for input
it cannot use; nothing here writes.
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .._atomic import one_line as _one_line
from .._atomic import open_regular, parse_number, read_small_text
from ..fit import check_fit_sampling, validate_b_values
from ..masking import (  # noqa: F401  (re-exported: io's public names)
    AUTO_MASK_PERCENTILE,
    MASK_FRACTION,
    auto_mask,
    lowest_b_image,
)
from .checks import InputError, check_bvecs, check_nifti


@dataclass
class DWI:
    """A loaded diffusion-weighted series.

    Attributes
    ----------
    data : array, shape (X, Y, Z, n_b)
        Signal with the file's scaling applied: float32, or the stored dtype (float32/float64,
        (u)int8/16) when the file has no scaling.
    b_values : float64 array (n_b,)
        s/mm², validated against the 4th dimension.
    img : nibabel image
        The input image (header and affine are the reference of every written map).
    path : Path
        Absolute path of the image.
    bvals_path : Path or None
        Where the b-values came from (None when passed as numbers).
    bvals_from_sidecar : bool
        True when the b-values were found as ``<stem>.bval`` beside the image.
    bvecs : float64 array (n_b, 3) or None
    bvecs_path : Path or None
    read_seconds : float
        Wall time of reading and decoding the image.
    """

    data: np.ndarray
    b_values: np.ndarray
    img: object
    path: Path
    bvals_path: Path | None = None
    bvals_from_sidecar: bool = False
    bvecs: np.ndarray | None = None
    bvecs_path: Path | None = None
    read_seconds: float = 0.0

    @property
    def spatial_shape(self) -> tuple:
        """``(X, Y, Z)``."""
        return self.data.shape[:3]


def image_stem(path) -> str:
    """File name without ``.nii`` / ``.nii.gz``: ``sub-01_dwi.nii.gz`` → ``sub-01_dwi``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def bval_sidecar(path) -> Path:
    """The BIDS b-value file that belongs beside an image: ``<stem>.bval``."""
    path = Path(path)
    return path.with_name(image_stem(path) + ".bval")


def bvec_sidecar(path) -> Path:
    """The BIDS b-vector file that belongs beside an image: ``<stem>.bvec``."""
    path = Path(path)
    return path.with_name(image_stem(path) + ".bvec")


def _check_readable_file(path: Path, what: str) -> None:
    """A readable regular file (links followed); a FIFO or device would block or never end."""
    import stat

    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected {'an' if what[0] in 'aeiou' else 'a'} "
                         f"{what}")
    if not stat.S_ISREG(path.stat().st_mode):
        raise InputError(f"{path}: is not a regular file (a FIFO, device or socket); expected "
                         f"{'an' if what[0] in 'aeiou' else 'a'} {what}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: cannot read {what} (permission denied)")


def load_nifti(path, what: str = "file"):
    """``nibabel.load`` with one-line errors; only NIfTI-1/NIfTI-2 ``.nii``/``.nii.gz``."""
    path = Path(path)
    _check_readable_file(path, what)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise InputError(f"{path}: not a NIfTI file (expected a .nii or .nii.gz name)")
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for garbage input
        raise InputError(f"{path}: not a NIfTI file ({_one_line(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI-1/NIfTI-2 image ({type(img).__name__})")
    check_nifti(img, path)  # before any data is read: a lying header costs nothing
    return img


def _gzip_verified(img, path: Path, dtype=None) -> np.ndarray:
    """The data array of a ``.nii.gz`` image, read through one gzip stream that is then read to
    its end, so that the CRC-32 and length in the gzip trailer are checked.

    nibabel alone stops decompressing at the end of the data and never reaches the trailer: a
    flipped bit in the compressed data would be fitted silently. Here the stream is decoded
    once (the array through nibabel's own :class:`~nibabel.arrayproxy.ArrayProxy`, with the
    file's scaling), and only the few bytes after the data are left to decode.
    """
    import gzip

    proxy = img.dataobj
    spec = (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
    with gzip.open(path, "rb") as fh:
        verified = nib.arrayproxy.ArrayProxy(fh, spec, order=proxy.order, mmap=False)
        data = np.asanyarray(verified) if dtype is None else np.asanyarray(verified, dtype=dtype)
        while fh.read(1 << 16):  # the end of the stream: gzip checks its CRC-32 and length
            pass
    if dtype is not None and data.dtype != dtype:
        data = data.astype(dtype)
    return data


def _read_array(img, path: Path, dtype=None) -> np.ndarray:
    """The image's array (``dtype``: converted, with scaling, as ``get_fdata``), a ``.nii.gz``
    checked to the end of its gzip stream (:func:`_gzip_verified`)."""
    if path.name.endswith(".gz"):
        return _gzip_verified(img, path, dtype)
    return np.asanyarray(img.dataobj) if dtype is None else img.get_fdata(dtype=dtype)


def _read_data(img, path: Path) -> np.ndarray:
    """The image's array with slope/intercept applied.

    Unscaled float32/float64 and small-integer data come back as stored (no copy: ``fit_ivim``
    converts only the masked voxels); anything else is converted to float32. A ``.nii.gz``
    whose gzip stream is damaged (CRC or length error, truncated) is refused.
    """
    try:
        # nibabel moves scl_slope/scl_inter from the header into the array proxy on load
        # (the header then reports (None, None)), so read the scaling from the proxy
        slope = getattr(img.dataobj, "slope", 1.0)
        inter = getattr(img.dataobj, "inter", 0.0)
        raw_dtype = img.get_data_dtype()
        unscaled = slope == 1.0 and inter == 0.0
        if unscaled and (raw_dtype.kind == "f" and raw_dtype.itemsize >= 4
                         or raw_dtype.kind in "iu" and raw_dtype.itemsize <= 2):
            return _read_array(img, path)
        return _read_array(img, path, np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{path}: damaged or truncated image data, not used "
                         f"({_one_line(exc)})") from None


def read_bvals(path) -> np.ndarray:
    """Read b-values (s/mm²) in FSL/BIDS form (one row) or one value per line.

    Returns the numbers as float64 without checking them (see :func:`load_dwi`).

    Raises
    ------
    InputError
        Missing/unreadable file, several rows of several values, or a token that is no number.
    """
    path = Path(path)
    text = read_small_text(path, "b-value file", InputError)
    rows = [line.replace(",", " ").split() for line in text.splitlines()]
    rows = [r for r in rows if r]
    if not rows:
        raise InputError(f"{path}: b-value file is empty")
    if len(rows) > 1 and any(len(r) > 1 for r in rows):
        raise InputError(f"{path}: expected one row of b-values or one value per line, "
                         f"got {len(rows)} rows of up to {max(map(len, rows))} values")
    values = []
    for token in (t for r in rows for t in r):
        try:
            values.append(parse_number(token))
        except ValueError:
            raise InputError(f"{path}: b-value {_short(token)} is not a number (plain decimal "
                             f"or scientific only, e.g. 800 or 8e2)") from None
    return np.array(values, dtype=np.float64)


def _short(token: str) -> str:
    from .._atomic import short_repr

    return short_repr(token, 40)


def read_bvecs(path, n_b: int) -> np.ndarray:
    """Read gradient directions (3 rows × n_b, FSL/BIDS, or n_b rows × 3) as ``(n_b, 3)``."""
    path = Path(path)
    text = read_small_text(path, "b-vector file", InputError)
    rows = [line.split() for line in text.splitlines()]
    rows = [r for r in rows if r and not r[0].startswith("#")]
    if not rows or len({len(r) for r in rows}) != 1:
        raise InputError(f"{path}: cannot read b-vectors (expected rows of equal length, got "
                         f"{sorted({len(r) for r in rows})} values per row)")
    try:
        v = np.array([[parse_number(t) for t in r] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"{path}: cannot read b-vectors ({exc})") from None
    check_bvecs(v, path)
    if v.shape == (3, n_b):
        return v.T.copy()
    if v.shape == (n_b, 3):
        return v
    raise InputError(f"{path}: b-vectors of shape {v.shape}, expected 3 × {n_b} "
                     f"(one direction per volume)")


def load_dwi(path, bvals=None, bvecs=None, model="ivim", fit=None) -> DWI:
    """Load a 4D DWI series and its b-values.

    Parameters
    ----------
    path : str or Path
        NIfTI-1/NIfTI-2 ``.nii`` or ``.nii.gz``, shape (X, Y, Z, n_b); any stored dtype, the
        scaling slope/intercept applied.
    bvals : str, Path, array_like or None
        b-value file (FSL/BIDS row, or one per line), or the values themselves (s/mm²). None:
        ``<stem>.bval`` beside the image (``DWI.bvals_from_sidecar`` is then True).
    bvecs : str or Path, optional
        Gradient directions, recorded only (repeated b-values are fitted as they come).
    model : str
        The signal model the b-values must suit (``simplified`` needs 3 distinct, not 4; see
        :func:`fastivim.validate_b_values`).
    fit : FitOptions, optional
        When given (its model replaces ``model``), the b-values are also checked against the
        fit options (b_threshold, uncertainty: :func:`fastivim.fit.check_fit_sampling`) here,
        before the image data is read, and a refusal names the b-value file.

    Returns
    -------
    DWI

    Raises
    ------
    InputError
        Missing or unreadable file, not a NIfTI, not 4D, no b-values, b-value count different
        from the 4th dimension, non-numeric/negative/NaN b-values, fewer than 4 distinct.
    """
    t0 = time.perf_counter()
    path = Path(path).absolute()
    img = load_nifti(path, "image")
    shape = img.shape
    if len(shape) != 4:
        dims = "×".join(map(str, shape))
        raise InputError(f"{path}: a {len(shape)}D image ({dims}); expected 4D with the "
                         f"b-values along the 4th axis")
    from_sidecar = False
    bvals_path = None
    if bvals is None:
        bvals_path = bval_sidecar(path)
        if not bvals_path.exists():  # a FIFO or folder there: read_bvals says what it is
            raise InputError(f"{path}: no b-values: pass --bvals FILE or put "
                             f"{bvals_path.name} beside the image")
        from_sidecar = True
    elif isinstance(bvals, (str, os.PathLike)):
        bvals_path = Path(bvals).absolute()
    if bvals_path is not None:
        b_raw = read_bvals(bvals_path)
        source = bvals_path
    else:
        b_raw, source = bvals, "b-values"
    try:
        b = validate_b_values(b_raw, shape[3], fit.model if fit is not None else model)
        if fit is not None:
            check_fit_sampling(b, fit)
    except ValueError as exc:
        raise InputError(f"{source}: {exc} ({path.name} has {shape[3]} volumes)"
                         if "samples per voxel" in str(exc) else f"{source}: {exc}") from None
    bvecs_path = bvec = None
    if bvecs is not None:
        bvecs_path = Path(bvecs).absolute()
        bvec = read_bvecs(bvecs_path, shape[3])
    data = _read_data(img, path)
    return DWI(data=data, b_values=b, img=img, path=path, bvals_path=bvals_path,
               bvals_from_sidecar=from_sidecar, bvecs=bvec, bvecs_path=bvecs_path,
               read_seconds=time.perf_counter() - t0)


def load_mask(path, reference_img) -> np.ndarray:
    """Read a 3D mask NIfTI on the reference grid; any non-zero (non-NaN) voxel is in.

    Raises
    ------
    InputError
        Unreadable/not NIfTI, not 3D, a different shape or affine than the image, or empty.
    """
    path = Path(path).absolute()
    img = load_nifti(path, "mask file")
    shape = img.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    ref_shape = reference_img.shape[:3]
    if len(shape) != 3 or shape != ref_shape:
        raise InputError(f"{path}: mask grid {'×'.join(map(str, img.shape))} does not match the "
                         f"image grid {'×'.join(map(str, ref_shape))}")
    if not np.allclose(img.affine, reference_img.affine, atol=1e-4, rtol=1e-5):
        raise InputError(f"{path}: mask affine differs from the image's (not the same grid)")
    try:
        m = _read_array(img, path).reshape(shape)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{path}: damaged or truncated mask data, not used "
                         f"({_one_line(exc)})") from None
    mask = np.nan_to_num(m) != 0 if m.dtype.kind == "f" else m != 0
    if not mask.any():
        raise InputError(f"{path}: mask is empty (no non-zero voxel)")
    return mask


# ------------------------------------------------------------------------- a run's outputs

def find_record(path) -> Path:
    """The run record of an output: ``path`` itself, ``path/fastivim.json`` (plain folder), or
    the one ``*_model-ivim_fastivim.json`` in ``path`` (a BIDS ``dwi`` folder).

    Raises
    ------
    InputError
        None found, or several in a BIDS folder (name the record then).
    """
    from .layout import BIDS_ENTITY, RECORD_NAME

    path = Path(path)
    if path.is_file():
        return path
    if (path / RECORD_NAME).is_file():
        return path / RECORD_NAME
    found = sorted(path.glob(f"*_{BIDS_ENTITY}_{RECORD_NAME}")) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise InputError(f"{path}: {len(found)} run records here ({names}); name one of them")
    raise InputError(f"{path / RECORD_NAME}: no such file (not a fastivim run output)")


def verify_manifest(layout, record: dict) -> None:
    """Check that every file the record's ``manifest`` lists is the one it describes.

    The record must have passed :func:`fastivim.io.record.check_record` (entries are plain
    file names of the layout's folder). Each file is opened as a regular file only (a FIFO or
    device planted at its name is refused without blocking) and read no further than the size
    the manifest gives.

    Raises
    ------
    InputError
        A file missing, not a regular file, or of another size or SHA-256 (a mix of two runs);
        names the file.
    """
    for name, want in record["manifest"].items():
        p = layout.folder / name
        if not os.path.lexists(p):
            raise InputError(f"{p}: listed in {layout.record.name} but missing (an incomplete "
                             f"run; run it again)")
        h = hashlib.sha256()
        with open_regular(p, "file of the run", InputError) as (fh, st):
            if st.st_size != want["bytes"]:
                raise InputError(f"{p}: not the file {layout.record.name} describes (written "
                                 f"by another run; run it again)")
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != want["sha256"]:
            raise InputError(f"{p}: not the file {layout.record.name} describes (written by "
                             f"another run; run it again)")


def check_listed(layout, record: dict, files) -> None:
    """Refuse when a file the run's result is read from is not in the record's manifest (a file
    the record does not vouch for: another run's, or planted).

    Raises
    ------
    InputError
        Names the file.
    """
    listed = record["manifest"]
    for p in files:
        if str(p.relative_to(layout.folder)) not in listed:
            raise InputError(f"{p}: not listed in {layout.record.name}'s manifest (not a file "
                             f"of that run; run it again)")


def load_output(path):
    """Read the maps of a finished run back (plain folder, or a BIDS series by its record).

    Parameters
    ----------
    path : str or Path
        A ``fastivim run -o`` folder, a run record, or a BIDS ``dwi`` folder with one record.

    Returns
    -------
    result : IVIMResult
    record : dict
        The run record.
    voxel_size : tuple of float
        mm, from the maps' header.
    layout : fastivim.io.layout.Layout
        Where the files are (the report is written beside them).

    Raises
    ------
    InputError
        No record, a missing or unreadable map, or maps of different shapes; the message names
        the file.
    """
    from .._atomic import short_repr
    from ..fit import IVIMResult
    from ..model import MAPS, MODELS, bounds_from_json
    from .layout import layout_of_record
    from .record import read_record

    rec_path = find_record(path)
    try:
        layout = layout_of_record(rec_path)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    record = read_record(rec_path)
    verify_manifest(layout, record)
    model = record.get("model", "ivim")
    if model not in MODELS:
        raise InputError(f"{rec_path}: malformed run record: unknown model "
                         f"{short_repr(model, 40)}")
    maps = {"D_star": None}  # absent for the simplified model
    zooms = None
    # optional maps (asked for) and newer ones (absent from older runs) count when listed
    wanted = [info for info in MAPS if info.produced_by(model) and not (
        (info.optional or info.newer) and layout.map_file(info).name not in record["manifest"])]
    check_listed(layout, record, [layout.map_file(info) for info in wanted])
    for info in wanted:
        p = layout.map_file(info)
        try:
            img = nib.load(p)
            arr = np.asarray(img.dataobj)
        except FileNotFoundError:
            raise InputError(f"{p}: missing map") from None
        except Exception as exc:  # nibabel raises many types for a damaged file
            raise InputError(f"{p}: cannot read the map ({_one_line(exc)})") from None
        if zooms is None:
            zooms = _voxel_size(img)
        maps[info.attr] = arr.astype(info.dtype, copy=False)
    shapes = {a.shape for a in maps.values() if a is not None}
    if len(shapes) != 1:
        raise InputError(f"{layout.folder}: maps of different shapes {sorted(shapes)}")
    from ..options import FitOptions

    try:
        result = IVIMResult(
            quality_mask=maps.pop("quality_mask") > 0,
            status=maps.pop("status"),
            method=str(record.get("method", "?")),
            bounds=bounds_from_json(record.get("bounds", {})),
            b_values=np.asarray(record.get("b_values", []), dtype=np.float64),
            b_threshold=float(record.get("b_threshold", FitOptions().b_threshold)),
            model=model,
            prior=record.get("prior"),
            noise_sigma=record.get("noise_sigma"),
            **maps,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{rec_path}: malformed run record ({_one_line(exc)})") from None
    return result, record, zooms, layout


def _voxel_size(img) -> tuple | None:
    """Voxel size (mm) of a map: the header's pixdim, or, where that is NaN, inf or not
    positive, the lengths of the affine's columns; None when neither is usable."""
    zooms = np.array(img.header.get_zooms()[:3], dtype=np.float64)
    if zooms.size == 3 and np.all(np.isfinite(zooms)) and np.all(zooms > 0):
        return tuple(float(z) for z in zooms)
    cols = np.sqrt(np.sum(np.asarray(img.affine, dtype=np.float64)[:3, :3] ** 2, axis=0))
    if np.all(np.isfinite(cols)) and np.all(cols > 0):
        return tuple(float(z) for z in cols)
    return None


def file_fingerprint(path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file's content (read in 1 MiB blocks).

    Raises
    ------
    InputError
        Not a regular file (a FIFO or device is refused without blocking), or unreadable.
    """
    h = hashlib.sha256()
    with open_regular(path, "file", InputError) as (fh, st):
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"size": st.st_size, "sha256": h.hexdigest()}


def input_fingerprints(dwi, bvals=None, bvecs=None, mask=None) -> dict:
    """Fingerprints (:func:`file_fingerprint`) of a run's input files, None where not a file.

    Recorded in every run record; ``fastivim batch`` reuses a series only while all of them
    are unchanged (an edited ``.bval`` means a refit).
    """
    out = {}
    for key, path in (("dwi", dwi), ("bvals", bvals), ("bvecs", bvecs), ("mask", mask)):
        try:
            out[key] = file_fingerprint(path) if path is not None else None
        except (OSError, ValueError):
            out[key] = None
    return out

