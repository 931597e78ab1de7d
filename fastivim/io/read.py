"""Reading: a 4D DWI series and its b-values, gradient directions and masks; a run's maps back.

Every function raises :class:`InputError` with a one-line message that names the file for input
it cannot use; nothing here writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .._atomic import one_line as _one_line
from ..fit import check_fit_sampling, validate_b_values
from ..masking import (  # noqa: F401  (re-exported: io's public names)
    AUTO_MASK_PERCENTILE,
    MASK_FRACTION,
    auto_mask,
    lowest_b_image,
)
from .checks import InputError, check_bvecs, check_nifti

#: Automatic mask: fraction of this percentile of the lowest-b image (see :func:`auto_mask`).

#: Default fraction of the automatic mask (``RunOptions.mask_fraction``).


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
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected {'an' if what[0] in 'aeiou' else 'a'} "
                         f"{what}")
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


def _read_data(img, path: Path) -> np.ndarray:
    """The image's array with slope/intercept applied.

    Unscaled float32/float64 and small-integer data come back as stored (no copy: ``fit_ivim``
    converts only the masked voxels); anything else is converted to float32.
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
            return np.asanyarray(img.dataobj)
        return img.get_fdata(dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read the image data ({_one_line(exc)})") from None


def read_bvals(path) -> np.ndarray:
    """Read b-values (s/mm²) in FSL/BIDS form (one row) or one value per line.

    Returns the numbers as float64 without checking them (see :func:`load_dwi`).

    Raises
    ------
    InputError
        Missing/unreadable file, several rows of several values, or a token that is no number.
    """
    path = Path(path)
    _check_readable_file(path, "b-value file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: editors may add a byte-order mark
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read b-value file ({_one_line(exc)})") from None
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
            values.append(float(token))
        except ValueError:
            raise InputError(f"{path}: b-value {token!r} is not a number") from None
    return np.array(values, dtype=np.float64)


def read_bvecs(path, n_b: int) -> np.ndarray:
    """Read gradient directions (3 rows × n_b, FSL/BIDS, or n_b rows × 3) as ``(n_b, 3)``."""
    path = Path(path)
    _check_readable_file(path, "b-vector file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: editors may add a byte-order mark
        v = np.loadtxt(text.splitlines(), dtype=np.float64, ndmin=2)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read b-vectors ({_one_line(exc)})") from None
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
        if not bvals_path.is_file():
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
        m = np.asanyarray(img.dataobj).reshape(shape)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read the mask data ({_one_line(exc)})") from None
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

    Raises
    ------
    InputError
        A file missing, or of another size or SHA-256 (a mix of two runs); names the file.
    """
    for name, want in (record.get("manifest") or {}).items():
        p = layout.folder / name
        try:
            payload = p.read_bytes()
        except OSError:
            raise InputError(f"{p}: listed in {layout.record.name} but missing (an incomplete "
                             f"run; run it again)") from None
        if len(payload) != want["bytes"] or hashlib.sha256(payload).hexdigest() != want["sha256"]:
            raise InputError(f"{p}: not the file {layout.record.name} describes (written by "
                             f"another run; run it again)")


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
    from ..fit import IVIMResult
    from ..model import MAPS, bounds_from_json
    from .layout import layout_of_record

    rec_path = find_record(path)
    try:
        record = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{rec_path}: cannot read the run record ({_one_line(exc)})") from None
    try:
        layout = layout_of_record(rec_path)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    verify_manifest(layout, record)
    model = record.get("model", "ivim")
    maps = {"D_star": None}  # absent for the simplified model
    zooms = None
    for info in MAPS:
        p = layout.map_file(info)
        if not info.produced_by(model) or ((info.optional or info.newer) and not p.exists()):
            continue
        try:
            img = nib.load(p)
            arr = np.asarray(img.dataobj)
        except FileNotFoundError:
            raise InputError(f"{p}: missing map") from None
        except Exception as exc:  # nibabel raises many types for a damaged file
            raise InputError(f"{p}: cannot read the map ({_one_line(exc)})") from None
        if zooms is None:
            zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        maps[info.attr] = arr.astype(info.dtype, copy=False)
    shapes = {a.shape for a in maps.values() if a is not None}
    if len(shapes) != 1:
        raise InputError(f"{layout.folder}: maps of different shapes {sorted(shapes)}")
    from ..options import FitOptions

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
    return result, record, zooms, layout


def file_fingerprint(path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file's content (read in 1 MiB blocks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"size": Path(path).stat().st_size, "sha256": h.hexdigest()}


def input_fingerprints(dwi, bvals=None, bvecs=None, mask=None) -> dict:
    """Fingerprints (:func:`file_fingerprint`) of a run's input files, None where not a file.

    Recorded in every run record; ``fastivim batch`` reuses a series only while all of them
    are unchanged (an edited ``.bval`` means a refit).
    """
    out = {}
    for key, path in (("dwi", dwi), ("bvals", bvals), ("bvecs", bvecs), ("mask", mask)):
        try:
            out[key] = file_fingerprint(path) if path is not None else None
        except OSError:
            out[key] = None
    return out

