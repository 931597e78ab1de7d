"""NIfTI in, parameter maps out: load a DWI series, mask it, and write maps, sidecars and BIDS.

Data flow::

    dwi.nii[.gz] + bvals ─ load_dwi ─> DWI ─ auto_mask / load_mask ─> fit_ivim ─> IVIMResult
        ─ save_maps ─> OUT_DIR/{D,D_star,f,S0,R2,RMSE,quality_mask,status}.nii.gz + .json
                       + OUT_DIR/fastivim.json
        ─ export_bids ─> DERIV/sub-XX/[ses-YY/]dwi/sub-XX_[ses-YY_]model-ivim_<map>.nii.gz + .json

The package is split by job:

* :mod:`fastivim.io.read`: the image, b-values, b-vectors and masks (:class:`InputError`), and
  a finished run's maps back (:func:`load_output`);
* :mod:`fastivim.io.write`: map images, sidecars, staged writing (:class:`OutputError`);
* :mod:`fastivim.io.layout`: the file names of the plain folder and of BIDS derivatives.

:func:`fit_file` runs the whole chain for one image (it calls :func:`fastivim.pipeline.run`)
and returns the run record. Importing this package imports nibabel (``import fastivim`` alone
does not).
"""

from __future__ import annotations

from ..model import MAPS
from .layout import (
    BIDS_ENTITY,
    BIDS_VERSION,
    RECORD_NAME,
    REPORT_FILES,
    Layout,
    bids_dir,
    bids_layout,
    bids_paths,
    map_paths,
    plain_layout,
    source_entities,
)
from .read import (
    AUTO_MASK_PERCENTILE,
    DWI,
    InputError,
    auto_mask,
    bval_sidecar,
    file_fingerprint,
    image_stem,
    input_fingerprints,
    load_dwi,
    load_mask,
    load_output,
    lowest_b_image,
    read_bvals,
    read_bvecs,
)
from .write import (
    GZIP_LEVEL,
    OutputError,
    check_writable,
    dataset_description,
    encode_maps,
    export_bids,
    map_image,
    nifti_bytes,
    save_maps,
    write_phantom,
)


def fit_file(dwi, *, bvals=None, bvecs=None, mask="auto", mask_fraction=None, method=None,
             b_threshold=None, bounds=None, model=None, uncertainty=None, seed=None,
             out_dir=None, bids=None, subject=None, session=None, overwrite=False,
             progress=False, threads=None, command=None, note=None) -> dict:
    """Load → mask → fit → write for one image; return the run record.

    Parameters
    ----------
    dwi : str or Path
        4D NIfTI (see :func:`load_dwi`).
    bvals, bvecs : str, Path or None
        As in :func:`load_dwi`.
    mask : "auto", None or path
        ``"auto"``: :func:`auto_mask`; None: every voxel; a path: :func:`load_mask`.
    mask_fraction : float, optional
        Of the automatic mask (default 0.1).
    method, b_threshold, bounds, model, uncertainty, seed : optional
        As in :func:`fastivim.fit_ivim` (None: the defaults of
        :class:`fastivim.options.FitOptions`).
    out_dir : str or Path, optional
        Plain layout (:func:`save_maps`); None writes none.
    bids, subject, session : optional
        BIDS derivatives (:func:`export_bids`), with the run record; None writes none.
    overwrite : bool
    progress : bool
        tqdm bar on stderr while fitting (only for volumes of 65,536 voxels or more).
    threads : int, optional
        numba threads for this call (the caller's setting is restored); None: leave it.
    command : str, optional
        Recorded as ``command`` (default: this process's argv).
    note : callable, optional
        Called with one-line progress notes (e.g. the b-value sidecar that was used).

    Returns
    -------
    dict
        The run record (see :func:`fastivim.pipeline.run`), also written as ``fastivim.json``.

    Raises
    ------
    InputError, OutputError
        One-line messages naming the file; nothing is written.
    ValueError
        Invalid options (method, bounds, b_threshold, threads...).
    """
    from ..options import RunOptions
    from ..pipeline import run

    given = {"method": method, "b_threshold": b_threshold, "mask_fraction": mask_fraction,
             "model": model, "uncertainty": uncertainty, "seed": seed}
    options = RunOptions.build(
        {k: v for k, v in given.items() if v is not None},
        bvals=bvals, bvecs=bvecs, no_mask=mask is None,
        mask=None if mask is None or (isinstance(mask, str) and mask == "auto") else mask,
        bounds=bounds, out_dir=out_dir, bids=bids, subject=subject, session=session,
        overwrite=overwrite, quiet=not progress, threads=threads)
    return run(dwi, options, command=command, note=note)


__all__ = ["AUTO_MASK_PERCENTILE", "BIDS_ENTITY", "BIDS_VERSION", "DWI", "GZIP_LEVEL", "MAPS",
           "RECORD_NAME", "REPORT_FILES", "InputError", "Layout", "OutputError", "auto_mask",
           "bids_dir", "bids_layout", "bids_paths", "bval_sidecar", "check_writable",
           "dataset_description", "encode_maps", "export_bids", "file_fingerprint", "fit_file",
           "image_stem", "input_fingerprints", "load_dwi", "load_mask", "load_output",
           "lowest_b_image", "map_image", "map_paths", "nifti_bytes", "plain_layout", "read_bvals",
           "read_bvecs", "save_maps", "source_entities", "write_phantom"]
