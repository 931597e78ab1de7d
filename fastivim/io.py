"""NIfTI in, parameter maps out: load a DWI series, mask it, and write maps, sidecars and BIDS.

Data flow::

    dwi.nii[.gz] + bvals ─ load_dwi ─> DWI ─ auto_mask / load_mask ─> fit_ivim ─> IVIMResult
        ─ save_maps ─> OUT_DIR/{D,D_star,f,S0,R2,RMSE,quality_mask,status}.nii.gz + .json
                       + OUT_DIR/fastivim.json
        ─ export_bids ─> DERIV/sub-XX/[ses-YY/]dwi/sub-XX_[ses-YY_]model-ivim_<map>.nii.gz + .json

:func:`fit_file` runs that whole chain for one image and returns the run record (what
``fastivim run`` prints and writes to ``fastivim.json``); a batch command can call it per subject.

Every map keeps the input's affine, qform/sform codes and spatial units, so it overlays the input
in any viewer. Float maps are stored float32, ``quality_mask`` and ``status`` uint8. Files are
written under a hidden ``.NAME.partial`` name and renamed only once every file of the run is
complete; a failure or an interrupt removes the partial files, so no map looks finished unless
it is. Bad input raises :class:`InputError`, output problems :class:`OutputError`, each with a
one-line message that names the file.

Importing this module imports nibabel (``import fastivim`` alone does not).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shlex
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from . import __version__
from ._atomic import one_line as _one_line
from .fit import check_fit_options, fit_ivim, load_kernel, validate_b_values
from .input_checks import InputError, check_bvecs, check_nifti
from .kernels.status import STATUS_MEANINGS

#: gzip level of written ``.nii.gz`` files. On 128×128×30 maps level 1 takes 57 ms per float32
#: map (1.00 MB) against 68-78 ms at level 6 (0.98 MB), and 5 ms against 32 ms per uint8 map.
GZIP_LEVEL = 1

#: Automatic mask: fraction of this percentile of the lowest-b image (see :func:`auto_mask`).
AUTO_MASK_PERCENTILE = 99.0

#: A progress bar is shown only when at least this many voxels are fitted.
PROGRESS_MIN_VOXELS = 1 << 16

#: BIDS entity that names every fastivim map: ``sub-01_[ses-01_]model-ivim_<map>.nii.gz``.
BIDS_ENTITY = "model-ivim"

#: BIDS ``BIDSVersion`` written to ``dataset_description.json``.
BIDS_VERSION = "1.9.0"

_MODEL = "S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D)), b in s/mm^2"


@dataclass(frozen=True)
class MapSpec:
    """One output map: file name, :class:`~fastivim.IVIMResult` attribute, dtype, units, text."""

    name: str
    attr: str
    dtype: str
    units: str
    description: str

    @property
    def bids_suffix(self) -> str:
        """The BIDS suffix (letters and digits only): ``D_star`` → ``Dstar``."""
        return self.name.replace("_", "")


#: The maps written per run, in order.
MAPS = (
    MapSpec("D", "D", "float32", "mm^2/s", "tissue (slow) diffusion coefficient D"),
    MapSpec("D_star", "D_star", "float32", "mm^2/s", "pseudo-diffusion coefficient D*"),
    MapSpec("f", "f", "float32", "none", "perfusion fraction f"),
    MapSpec("S0", "S0", "float32", "arbitrary", "fitted signal at b = 0, in the input's units"),
    MapSpec("R2", "r_squared", "float32", "none", "coefficient of determination of the fit"),
    MapSpec("RMSE", "rmse", "float32", "arbitrary",
            "root-mean-square residual of the fit, in the input's units"),
    MapSpec("quality_mask", "quality_mask", "uint8", "none",
            "1 where the fit converged inside the bounds with D_star > D (status 0)"),
    MapSpec("status", "status", "uint8", "none", "per-voxel fit status code (see Levels)"),
)


class OutputError(RuntimeError):
    """Outputs that cannot or must not be written; the one-line message names the path."""


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


def _check_readable_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected {'an' if what[0] in 'aeiou' else 'a'} "
                         f"{what}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: cannot read {what} (permission denied)")


def _load_nifti(path, what: str = "file"):
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


def load_dwi(path, bvals=None, bvecs=None) -> DWI:
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
    img = _load_nifti(path, "image")
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
        b = validate_b_values(b_raw, shape[3])
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


def lowest_b_image(data, b_values) -> np.ndarray:
    """Mean of the volumes at the lowest b-value, float32 (X, Y, Z)."""
    b = np.asarray(b_values)
    idx = np.flatnonzero(b == b.min())
    return np.mean(np.asarray(data)[..., idx], axis=-1, dtype=np.float32)


def auto_mask(data, b_values, fraction: float = 0.1) -> tuple[np.ndarray, float]:
    """Automatic mask from the lowest-b (b = 0) image.

    A voxel is in when its lowest-b signal exceeds ``fraction`` × the 99th percentile of the
    lowest-b image (a robust maximum, so a few hot voxels do not move it). This drops the
    noise-only background, which a plain low-percentile cut keeps when it fills much of the
    field of view.

    Parameters
    ----------
    data : array, shape (X, Y, Z, n_b)
    b_values : array (n_b,)
        s/mm².
    fraction : float
        In [0, 1); 0 keeps every voxel with positive signal.

    Returns
    -------
    mask : bool array (X, Y, Z)
    threshold : float
        The lowest-b signal level used, in the input's units.
    """
    b0 = lowest_b_image(data, b_values)
    finite = np.isfinite(b0)
    ref = float(np.percentile(b0[finite], AUTO_MASK_PERCENTILE)) if finite.any() else 0.0
    threshold = max(fraction * ref, 0.0)
    with np.errstate(invalid="ignore"):
        mask = finite & (b0 > threshold)
    return mask, threshold


def load_mask(path, reference_img) -> np.ndarray:
    """Read a 3D mask NIfTI on the reference grid; any non-zero (non-NaN) voxel is in.

    Raises
    ------
    InputError
        Unreadable/not NIfTI, not 3D, a different shape or affine than the image, or empty.
    """
    path = Path(path).absolute()
    img = _load_nifti(path, "mask file")
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


# ----------------------------------------------------------------------------------- writing

def _identity_reference(shape):
    img = nib.Nifti1Image(np.zeros(shape + (1,), dtype=np.float32), np.eye(4))
    img.header.set_xyzt_units("mm")
    return img


def _as_reference(reference_img, shape):
    if reference_img is None:
        return _identity_reference(shape)
    if isinstance(reference_img, (str, os.PathLike)):
        reference_img = _load_nifti(reference_img, "reference image")
    if tuple(reference_img.shape[:3]) != tuple(shape):
        raise ValueError(f"reference image grid {reference_img.shape[:3]} does not match the "
                         f"maps' {tuple(shape)}")
    return reference_img


def map_image(data, reference_img, dtype="float32", descrip=""):
    """A 3D NIfTI of ``data`` that overlays ``reference_img`` exactly.

    The header is the reference's with the map's shape and dtype, no scaling, no extensions,
    the same affine and qform/sform codes and the same spatial units. NIfTI-2 in, NIfTI-2 out.
    """
    hdr = reference_img.header.copy()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(np.nan, np.nan)
    hdr.set_xyzt_units(xyz=reference_img.header.get_xyzt_units()[0], t="unknown")
    hdr["descrip"] = descrip.encode("ascii", "replace")[:79]
    hdr["intent_code"] = 0
    hdr["cal_min"] = hdr["cal_max"] = 0
    hdr.extensions.clear()
    klass = nib.Nifti2Image if isinstance(reference_img, nib.Nifti2Image) else nib.Nifti1Image
    img = klass(np.asarray(data, dtype=dtype), reference_img.affine, hdr)
    # The affine equals the header's, so nibabel keeps both codes; make sure of it.
    img.header["qform_code"] = reference_img.header["qform_code"]
    img.header["sform_code"] = reference_img.header["sform_code"]
    return img


def nifti_bytes(img, compresslevel: int = GZIP_LEVEL) -> bytes:
    """The ``.nii.gz`` file content of ``img`` (gzip at ``compresslevel``)."""
    return gzip.compress(img.to_bytes(), compresslevel=compresslevel, mtime=0)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


class _Staging:
    """Write files under hidden ``.NAME.partial`` names; rename all at :meth:`commit`.

    Used as a context manager: any exception (or interrupt) before the commit removes the
    partial files and the directories this staging created.
    """

    def __init__(self):
        self._items = []
        self._made_dirs = []

    def makedirs(self, d: Path) -> None:
        missing = []
        p = d
        while not p.exists():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            p.mkdir()
            self._made_dirs.append(p)

    def write(self, final: Path, payload: bytes) -> None:
        self.makedirs(final.parent)
        partial = final.with_name(f".{final.name}.partial")
        self._items.append((partial, final))
        with open(partial, "wb") as fh:
            fh.write(payload)

    def commit(self) -> list:
        for partial, final in self._items:
            os.replace(partial, final)
        done = [final for _, final in self._items]
        self._items = []
        self._made_dirs = []
        return done

    def abort(self) -> None:
        for partial, _ in self._items:
            try:
                partial.unlink()
            except OSError:
                pass
        for d in reversed(self._made_dirs):
            try:
                d.rmdir()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            if issubclass(exc_type, OSError) and not isinstance(exc, OutputError):
                path = getattr(exc, "filename", None) or "output"
                raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        return False


def check_writable(targets, overwrite: bool = False) -> None:
    """Refuse before any work if an output exists (without ``overwrite``) or cannot be written.

    Parameters
    ----------
    targets : iterable of Path
        Every file the run will write.

    Raises
    ------
    OutputError
        The first existing target (naming ``--overwrite``), or a directory that cannot be
        created or written.
    """
    targets = [Path(t) for t in targets]
    if not overwrite:
        for t in targets:
            if t.exists():
                raise OutputError(f"{t}: output exists (use --overwrite to replace it)")
    for d in sorted({t.parent for t in targets}):
        p = d
        while not p.exists():
            p = p.parent
        if not p.is_dir():
            raise OutputError(f"{d}: cannot create output directory ({p} is not a directory)")
        try:
            fd, probe = tempfile.mkstemp(prefix=".fastivim-probe-", dir=p)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise OutputError(f"{d}: output directory is not writable "
                              f"({exc.strerror or exc})") from None


def _json_bounds(bounds: dict) -> dict:
    return {k: [lo, None if math.isinf(hi) else hi] for k, (lo, hi) in bounds.items()}


def _sidecar(spec: MapSpec, result) -> dict:
    side = {
        "Description": spec.description,
        "Units": spec.units,
        "Model": _MODEL,
        "FittingMethod": result.method,
        "BValues": [float(v) for v in result.b_values],
        "BThreshold": result.b_threshold,
        "Bounds": _json_bounds(result.bounds),
        "Software": {"Name": "fastivim", "Version": __version__},
    }
    if spec.name == "status":
        side["Levels"] = {str(k): v for k, v in STATUS_MEANINGS.items()}
    if spec.name == "quality_mask":
        side["Levels"] = {"0": "failed the quality checks or not fitted", "1": "passed"}
    return side


def _encode_maps(result, reference_img):
    """``[(MapSpec, nii.gz bytes)]``; the gzip runs in threads (zlib releases the GIL)."""
    ref = _as_reference(reference_img, result.shape)

    def one(spec):
        data = getattr(result, spec.attr)
        img = map_image(data, ref, spec.dtype, f"fastivim {__version__} {spec.name}")
        return spec, nifti_bytes(img)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, MAPS))


def map_paths(out_dir) -> list:
    """Every file :func:`save_maps` writes into ``out_dir``."""
    out_dir = Path(out_dir)
    files = []
    for spec in MAPS:
        files += [out_dir / f"{spec.name}.nii.gz", out_dir / f"{spec.name}.json"]
    return files + [out_dir / "fastivim.json"]


def bids_dir(deriv_dir, subject: str, session: str | None = None) -> Path:
    """``DERIV/sub-XX/[ses-YY/]dwi``."""
    d = Path(deriv_dir) / f"sub-{subject}"
    if session:
        d = d / f"ses-{session}"
    return d / "dwi"


def bids_paths(deriv_dir, subject: str, session: str | None = None) -> list:
    """Every map and sidecar :func:`export_bids` writes (not ``dataset_description.json``)."""
    d = bids_dir(deriv_dir, subject, session)
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "") + f"_{BIDS_ENTITY}"
    files = []
    for spec in MAPS:
        stem = f"{prefix}_{spec.bids_suffix}"
        files += [d / f"{stem}.nii.gz", d / f"{stem}.json"]
    return files


def dataset_description() -> dict:
    """Content of the derivatives' ``dataset_description.json`` (BIDS, ``GeneratedBy``)."""
    return {
        "Name": "fastivim IVIM parameter maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fastivim", "Version": __version__,
                         "Description": "voxel-wise IVIM fit: " + _MODEL}],
    }


def _check_label(label, what):
    if label is None or not str(label).isalnum():
        raise ValueError(f"BIDS {what} label must be letters and digits (no 'sub-'/'ses-'), "
                         f"got {label!r}")
    return str(label)


def save_maps(result, out_dir, reference_img=None, overwrite=False, record=None,
              _encoded=None) -> list:
    """Write every map of a fit as NIfTI with a JSON sidecar, plus ``fastivim.json``.

    Parameters
    ----------
    result : IVIMResult
        Maps of shape (X, Y, Z), e.g. from :func:`fastivim.fit_ivim`.
    out_dir : str or Path
        Created if missing. Files: ``D``, ``D_star``, ``f``, ``S0``, ``R2``, ``RMSE`` (float32)
        and ``quality_mask``, ``status`` (uint8), each ``.nii.gz`` + ``.json``.
    reference_img : nibabel image or path, optional
        The input whose affine, qform/sform codes and units the maps copy. None: identity
        affine, 1 mm voxels.
    overwrite : bool
        Replace existing files; otherwise an existing one is an :class:`OutputError`.
    record : dict, optional
        Written as ``fastivim.json`` (default: method, bounds, b-values and version only).

    Returns
    -------
    list of Path
        The files written.
    """
    out_dir = Path(out_dir)
    targets = map_paths(out_dir)
    check_writable(targets, overwrite)
    encoded = _encoded if _encoded is not None else _encode_maps(result, reference_img)
    if record is None:
        record = {"version": __version__, "method": result.method,
                  "bounds": _json_bounds(result.bounds),
                  "b_values": [float(v) for v in result.b_values]}
    with _Staging() as st:
        for spec, payload in encoded:
            st.write(out_dir / f"{spec.name}.nii.gz", payload)
            st.write(out_dir / f"{spec.name}.json", _json_bytes(_sidecar(spec, result)))
        st.write(out_dir / "fastivim.json", _json_bytes(record))
        return st.commit()


def export_bids(result, deriv_dir, subject, session=None, reference_img=None, overwrite=False,
                _encoded=None) -> list:
    """Write a fit as BIDS derivatives.

    Layout::

        DERIV/dataset_description.json             (written once, kept if present)
        DERIV/sub-<subject>/[ses-<session>/]dwi/
            sub-<subject>_[ses-<session>_]model-ivim_<map>.nii.gz  + .json

    with ``<map>`` one of ``D``, ``Dstar``, ``f``, ``S0``, ``R2``, ``RMSE``, ``qualitymask``,
    ``status``.

    Parameters
    ----------
    result : IVIMResult
    deriv_dir : str or Path
    subject, session : str
        Labels without the ``sub-``/``ses-`` prefix (letters and digits).
    reference_img : nibabel image or path, optional
        As in :func:`save_maps`.
    overwrite : bool

    Returns
    -------
    list of Path
        The files written.
    """
    subject = _check_label(subject, "subject")
    session = _check_label(session, "session") if session is not None else None
    deriv_dir = Path(deriv_dir)
    targets = bids_paths(deriv_dir, subject, session)
    check_writable(targets, overwrite)
    encoded = _encoded if _encoded is not None else _encode_maps(result, reference_img)
    with _Staging() as st:
        desc = deriv_dir / "dataset_description.json"
        if not desc.exists():
            st.write(desc, _json_bytes(dataset_description()))
        for (spec, payload), nii in zip(encoded, targets[0::2], strict=True):
            st.write(nii, payload)
            st.write(nii.with_name(nii.name[:-len(".nii.gz")] + ".json"),
                     _json_bytes(_sidecar(spec, result)))
        return st.commit()


# ---------------------------------------------------------------------------- one subject

def summarize(result) -> dict:
    """Median and quartiles of D, D_star, f inside the quality mask, and voxel counts."""
    q = result.quality_mask
    stats = {}
    for name in ("D", "D_star", "f"):
        v = getattr(result, name)[q]
        if v.size:
            q25, med, q75 = (float(x) for x in np.percentile(v, [25, 50, 75]))
        else:
            q25 = med = q75 = None
        stats[name] = {"median": med, "q25": q25, "q75": q75}
    counts = result.status_counts()
    n_total = int(result.status.size)
    outside = counts.get(6, 0)
    return {"stats": stats,
            "voxels": {"total": n_total, "fitted": n_total - outside, "quality": int(q.sum()),
                       "status_counts": {str(k): v for k, v in counts.items()}}}


def fit_file(dwi, *, bvals=None, bvecs=None, mask="auto", mask_fraction=0.1,
             method="segmented", b_threshold=200.0, bounds=None, out_dir=None, bids=None,
             subject=None, session=None, overwrite=False, progress=False, threads=None,
             command=None, note=None) -> dict:
    """Load → mask → fit → write for one image; return the run record.

    Parameters
    ----------
    dwi : str or Path
        4D NIfTI (see :func:`load_dwi`).
    bvals, bvecs : str, Path or None
        As in :func:`load_dwi`.
    mask : "auto", None or path
        ``"auto"``: :func:`auto_mask`; None: every voxel; a path: :func:`load_mask`.
    mask_fraction : float
        Of the automatic mask.
    method, b_threshold, bounds
        As in :func:`fastivim.fit_ivim`.
    out_dir : str or Path, optional
        Plain layout (:func:`save_maps`); None writes none.
    bids, subject, session : optional
        BIDS derivatives (:func:`export_bids`); None writes none.
    overwrite : bool
    progress : bool
        tqdm bar on stderr while fitting (only for volumes of 65,536 voxels or more).
    threads : int, optional
        numba threads (``numba.set_num_threads``); None leaves the current setting.
    command : str, optional
        Recorded as ``command`` (default: this process's argv).
    note : callable, optional
        Called with one-line progress notes (e.g. the b-value sidecar that was used).

    Returns
    -------
    dict
        The run record, also written as ``fastivim.json`` in ``out_dir``: ``version``,
        ``input``, ``command``, ``method``, ``bounds``, ``b_values``, ``mask_source``,
        ``voxels``, ``stats``, ``timings`` (seconds: read, mask, fit, write, total), ...
        The ``write`` and ``total`` saved in ``fastivim.json`` stop just before that file set
        is written (encoding included); the returned record includes the writing too.

    Raises
    ------
    InputError, OutputError
        One-line messages naming the file; nothing is written.
    ValueError
        Invalid fit options (method, bounds, b_threshold).
    """
    t_start = time.perf_counter()
    note = note or (lambda msg: None)
    if out_dir is None and bids is None:
        raise ValueError("nothing to write: give out_dir or bids")
    # fit options that do not depend on the data are checked before a large image is read
    check_fit_options(method, bounds, b_threshold)
    if bids is not None:
        subject = _check_label(subject, "subject")
        session = _check_label(session, "session") if session is not None else None
    if out_dir is not None:
        check_writable(map_paths(out_dir), overwrite)
    if bids is not None:
        check_writable(bids_paths(bids, subject, session), overwrite)
    import numba

    threads_before = numba.get_num_threads()
    if threads is not None:
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                             f"on this machine, got {threads}")
        numba.set_num_threads(threads)
    try:
        d = load_dwi(dwi, bvals=bvals, bvecs=bvecs)
        if d.bvals_from_sidecar:
            note(f"using b-values from {d.bvals_path}")
        t_read = time.perf_counter()

        if mask is None:
            mask_arr, mask_source = None, "none"
        elif isinstance(mask, str) and mask == "auto":
            mask_arr, thr = auto_mask(d.data, d.b_values, mask_fraction)
            mask_source = (f"auto: lowest-b signal > {mask_fraction:g} x its "
                           f"{AUTO_MASK_PERCENTILE:g}th percentile ({thr:.6g})")
            if not mask_arr.any():
                raise InputError(f"{d.path}: the automatic mask is empty (no signal in the "
                                 f"lowest-b image); pass --mask FILE or --no-mask")
        else:
            mask_arr = load_mask(mask, d.img)
            mask_source = str(Path(mask).absolute())
        t_mask = time.perf_counter()

        n_fit = int(mask_arr.sum()) if mask_arr is not None else int(np.prod(d.spatial_shape))
        # the compiled kernel's one-off load (or first compile) is timed on its own, so "fit"
        # measures fitting
        t_load = load_kernel(d.data.dtype)
        t_mask += t_load
        show_bar = progress and n_fit >= PROGRESS_MIN_VOXELS
        result = fit_ivim(d.data, d.b_values, mask=mask_arr, method=method, bounds=bounds,
                          b_threshold=b_threshold, progress=show_bar)
        t_fit = time.perf_counter()

        encoded = _encode_maps(result, d.img)
        summary = summarize(result)
        record = {
            "software": "fastivim",
            "version": __version__,
            "command": command if command is not None else shlex.join(
                [Path(sys.argv[0]).name, *sys.argv[1:]]),
            "input": str(d.path),
            "input_shape": list(d.data.shape),
            "b_values": [float(v) for v in d.b_values],
            "bvals_source": str(d.bvals_path) if d.bvals_path else "given as numbers",
            "bvecs": d.bvecs.tolist() if d.bvecs is not None else None,
            "bvecs_source": str(d.bvecs_path) if d.bvecs_path else None,
            "method": result.method,
            "b_threshold": result.b_threshold,
            "bounds": _json_bounds(result.bounds),
            "mask_source": mask_source,
            "threads": _numba_threads(),
            **summary,
            "outputs": {"out_dir": str(Path(out_dir).absolute()) if out_dir is not None else None,
                        "bids": None},
            "timings": {},
        }
        written = []
        if bids is not None:
            written += export_bids(result, bids, subject, session, reference_img=d.img,
                                   overwrite=overwrite, _encoded=encoded)
            record["outputs"]["bids"] = str(bids_dir(bids, subject, session).absolute())
        t_end = time.perf_counter()
        record["timings"] = {"read": t_read - t_start, "mask": t_mask - t_load - t_read,
                             "load_kernel": t_load, "fit": t_fit - t_mask,
                             "write": t_end - t_fit, "total": t_end - t_start,
                             "voxels_per_second": n_fit / max(t_fit - t_mask, 1e-9)}
        if out_dir is not None:
            written += save_maps(result, out_dir, overwrite=overwrite, record=record,
                                 _encoded=encoded)
            t_end = time.perf_counter()
            record["timings"].update(write=t_end - t_fit, total=t_end - t_start)
        record["files"] = [str(p) for p in written]
        return record
    finally:
        numba.set_num_threads(threads_before)  # a library call leaves the caller's setting


def _numba_threads():
    try:
        import numba

        return int(numba.get_num_threads())
    except Exception:  # pragma: no cover
        return None


def write_phantom(path, ph, voxel_size=(2.0, 2.0, 3.0), overwrite=False) -> list:
    """Write a :class:`fastivim.simulate.Phantom` as a DWI NIfTI with its truth.

    Files: ``path`` (float32, 4D), ``<stem>.bval`` (one row) and ``<stem>_truth/`` holding
    ``D``, ``D_star``, ``f``, ``S0`` (float32) and ``mask`` (uint8) ``.nii.gz``. The affine has
    the given voxel size (mm), an offset, sform code 2 (aligned) and qform code 1 (scanner).

    Returns
    -------
    list of Path
    """
    path = Path(path)
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
        raise OutputError(f"{path}: output name must end in .nii or .nii.gz")
    stem = image_stem(path)
    truth_dir = path.with_name(stem + "_truth")
    names = ("D", "D_star", "f", "S0", "mask")
    targets = [path, bval_sidecar(path)] + [truth_dir / f"{n}.nii.gz" for n in names]
    check_writable(targets, overwrite)
    shape = ph.signal.shape[:-1]
    if len(shape) != 3:
        raise ValueError(f"phantom must be 3D, got spatial shape {shape}")
    affine = np.diag([*voxel_size, 1.0])
    affine[:3, 3] = -np.asarray(voxel_size) * (np.asarray(shape) - 1) / 2
    img = nib.Nifti1Image(ph.signal.astype(np.float32), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"fastivim phantom"
    truth = dict(ph.truth(), mask=ph.mask)
    with _Staging() as st:
        raw = img.to_bytes()
        st.write(path, gzip.compress(raw, GZIP_LEVEL, mtime=0) if path.name.endswith(".gz")
                 else raw)
        st.write(bval_sidecar(path), (" ".join(f"{v:g}" for v in ph.b_values) + "\n").encode())
        for n in names:
            dtype = "uint8" if n == "mask" else "float32"
            st.write(truth_dir / f"{n}.nii.gz",
                     nifti_bytes(map_image(truth[n], img, dtype, f"truth {n}")))
        return st.commit()
