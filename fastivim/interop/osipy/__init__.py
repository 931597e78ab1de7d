"""osipy's IVIM entry points on fastivim: switch with one import line.

::

    # import osipy
    # from osipy.ivim import FittingMethod
    import fastivim.interop.osipy as osipy
    from fastivim.interop.osipy.ivim import FittingMethod

    dwi_dataset = osipy.load_nifti("dwi_multi_b.nii.gz")
    result = osipy.fit_ivim(signal=dwi_dataset.data, b_values=b_values, mask=mask,
                            method=FittingMethod.SEGMENTED)
    D = result.d_map.values
    osipy.export_bids({"D": result.d_map, "D_star": result.d_star_map, "f": result.f_map},
                      "derivatives/osipy", "01", "01")

The names, parameter order and units are those of osipy's IVIM tutorial (osipy 0.1,
``docs/tutorials/ivim-analysis.md``); the maps are exactly :func:`fastivim.fit_ivim`'s. See
:mod:`fastivim.interop.osipy.ivim` for the fit and where it differs from osipy.

Where the reading and writing differ from osipy, and why
--------------------------------------------------------
* :func:`load_nifti` reads with fastivim's checked reader (:mod:`fastivim.io`): a missing,
  unreadable or malformed file is a one-line :class:`fastivim.io.InputError` naming it
  (osipy raises ``FileNotFoundError`` or nibabel's errors). ``.data`` is the stored array with
  the header's scaling applied (osipy converts to float64 here; fastivim fits any real dtype).
* :func:`export_bids` writes through fastivim's own BIDS writer
  (:func:`fastivim.io.export_bids`): all-or-nothing, fastivim's names
  ``DERIV/sub-XX/[ses-YY/]dwi/sub-XX_[ses-YY_]model-ivim_<map>.nii.gz`` with a JSON sidecar per
  map (osipy: ``perf/sub-XX_<key>.nii.gz`` and one ``_perf.json``), and the run record
  ``..._model-ivim_fastivim.json`` holding ``metadata`` under ``"metadata"``. Which maps are
  written follows the ``ParameterMap`` values given, not their keys. As in osipy an earlier
  export into the same folder is replaced. The maps carry the identity affine, as osipy's do
  when the fit was given a bare array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ivim import (
    FittingError,
    FittingMethod,
    IVIMFitParams,
    IVIMFitResult,
    ParameterMap,
    fit_ivim,
)


@dataclass
class PerfusionDataset:
    """A loaded image (the fields of osipy's ``PerfusionDataset`` the tutorial uses).

    Attributes
    ----------
    data : array (..., n_b)
        The image data, scaling applied.
    affine : (4, 4) float64 array
    source_path : Path
    """

    data: np.ndarray
    affine: np.ndarray
    source_path: Path

    @property
    def shape(self) -> tuple:
        """Shape of ``data``."""
        return self.data.shape


def load_nifti(path) -> PerfusionDataset:
    """Load a NIfTI image (osipy's name) with fastivim's checked reader.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz``.

    Returns
    -------
    PerfusionDataset

    Raises
    ------
    fastivim.io.InputError
        One line naming the file: missing, unreadable, not NIfTI, inconsistent header.
    """
    from ...io.read import load_nifti as _load

    img = _load(path, "image")
    return PerfusionDataset(data=np.asanyarray(img.dataobj), affine=np.asarray(img.affine),
                            source_path=Path(path))


#: Result attributes that are parameter maps of a fastivim fit (the rest are set aside when
#: only some maps are exported).
_MAP_ATTRS = ("D", "D_star", "f", "S0", "r_squared", "rmse", "quality_mask", "status",
              "D_sd", "D_star_sd", "f_sd", "S0_sd")


class _Selected:
    """A fastivim result showing only some of its maps (the writer writes what it holds)."""

    def __init__(self, result, attrs):
        self._result = result
        self._attrs = set(attrs)

    def __getattr__(self, name):
        if name in _MAP_ATTRS and name not in self._attrs:
            return None
        return getattr(self._result, name)

    @property
    def shape(self):
        return self._result.shape


def export_bids(parameter_maps, output_dir, subject_id, session_id=None, metadata=None) -> Path:
    """Write parameter maps as BIDS derivatives (osipy's signature) with fastivim's writer.

    Parameters
    ----------
    parameter_maps : dict of str to ParameterMap
        Maps of one :func:`fit_ivim` result (keys are labels only).
    output_dir : str or Path
        The derivatives root.
    subject_id, session_id : str
        Labels without ``sub-``/``ses-`` (letters and digits).
    metadata : dict, optional
        Stored under ``"metadata"`` in the run record.

    Returns
    -------
    Path
        The folder written: ``output_dir/sub-XX/[ses-YY/]dwi``.

    Raises
    ------
    ValueError
        No maps, maps not from :func:`fit_ivim` or from different fits, a bad label.
    fastivim.io.OutputError
        The folder cannot be written (one line naming it); nothing is written.
    """
    from ...io import bids_dir
    from ...io import export_bids as _export
    from ...io.write import default_record

    if not parameter_maps:
        raise ValueError("parameter_maps cannot be empty")
    if not subject_id:
        raise ValueError("subject_id cannot be empty")
    results = {id(getattr(m, "_result", None)): getattr(m, "_result", None)
               for m in parameter_maps.values()}
    if None in results.values():
        raise ValueError("parameter_maps must be maps of a fastivim.interop.osipy fit_ivim "
                         "result")
    if len(results) != 1:
        raise ValueError("parameter_maps must all come from one fit_ivim result")
    result = next(iter(results.values()))
    view = _Selected(result, [m._attr for m in parameter_maps.values()])
    record = default_record(result)
    if metadata:
        record["metadata"] = dict(metadata)
    _export(view, output_dir, str(subject_id), None if session_id is None else str(session_id),
            overwrite=True, record=record)
    return bids_dir(output_dir, str(subject_id), None if session_id is None else str(session_id))


__all__ = ["FittingError", "FittingMethod", "IVIMFitParams", "IVIMFitResult", "ParameterMap",
           "PerfusionDataset", "export_bids", "fit_ivim", "load_nifti"]
