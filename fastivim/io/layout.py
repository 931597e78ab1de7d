"""Where every file of a run goes: the plain output folder and BIDS derivatives names.

Plain (``fastivim run ... -o OUT``)::

    OUT/<map>.nii.gz + OUT/<map>.json      <map> = MapInfo.name: D, D_star, f, S0, R2, RMSE, ...
    OUT/fastivim.json                       the run record, written last
    OUT/report.html, OUT/report_*.png       the quality-control report (optional)

BIDS (``fastivim run ... --bids DERIV --subject 01 [--session 02]`` and ``fastivim batch``)::

    DERIV/dataset_description.json
    DERIV/sub-01/[ses-02/]dwi/sub-01_[ses-02_][<entities>_]model-ivim_<suffix>.nii.gz + .json
                                                       <suffix> = MapInfo.bids_suffix: Dstar, ...
                         <entities>: those of a BIDS-named input besides sub/ses (acq-a, run-2)
    DERIV/sub-01/[ses-02/]dwi/sub-01_[ses-02_]model-ivim_fastivim.json      the run record
    DERIV/sub-01/[ses-02/]dwi/sub-01_[ses-02_]model-ivim_report.html, ..._report_*.png

Both are a :class:`Layout`: a folder and a file-name prefix. The maps come from
:data:`fastivim.model.MAPS`. This module only names files; it reads and writes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..model import MAPS

#: BIDS entity that names every fastivim map: ``sub-01_[ses-01_]model-ivim_<map>.nii.gz``.
BIDS_ENTITY = "model-ivim"

#: BIDS ``BIDSVersion`` written to ``dataset_description.json``.
BIDS_VERSION = "1.9.0"

#: Name of the run record (after the layout's prefix): ``fastivim.json``.
RECORD_NAME = "fastivim.json"

#: Files of the quality-control report (after the layout's prefix), by figure.
REPORT_FILES = {
    "html": "report.html",
    "maps": "report_maps.png",
    "histograms": "report_histograms.png",
    "decay": "report_decay.png",
}


@dataclass(frozen=True)
class Layout:
    """The files of one run: ``folder / (prefix + name)``.

    Attributes
    ----------
    folder : Path
    prefix : str
        ``""`` for the plain layout, ``"sub-01_[ses-02_]model-ivim_"`` for BIDS.
    bids : bool
        Map files are named by their BIDS suffix (``Dstar``) rather than their name (``D_star``).
    root : Path or None
        The folder the user named (BIDS: the derivatives folder), when ``folder`` lies below it:
        the folders between are fastivim's and must not be links. None: ``folder`` itself.
    """

    folder: Path
    prefix: str = ""
    bids: bool = False
    root: Path | None = None

    def map_file(self, info) -> Path:
        """The ``.nii.gz`` of a :class:`fastivim.model.MapInfo`."""
        stem = info.bids_suffix if self.bids else info.name
        return self.folder / f"{self.prefix}{stem}.nii.gz"

    def sidecar(self, info) -> Path:
        """The ``.json`` sidecar of a map."""
        return self.map_file(info).with_suffix("").with_suffix(".json")

    @property
    def record(self) -> Path:
        """The run record (completion marker, written last)."""
        return self.folder / f"{self.prefix}{RECORD_NAME}"

    def report_file(self, figure: str) -> Path:
        """A file of the report: ``figure`` is a key of :data:`REPORT_FILES`."""
        return self.folder / f"{self.prefix}{REPORT_FILES[figure]}"

    def map_files(self, maps=MAPS) -> list:
        """Each map's ``.nii.gz`` and ``.json``, in table order."""
        files = []
        for info in maps:
            files += [self.map_file(info), self.sidecar(info)]
        return files

    def owned_files(self) -> list:
        """Every file a run of this layout may have written (any map, record, report)."""
        return self.map_files() + [self.record] + [self.report_file(k) for k in REPORT_FILES]


def plain_layout(out_dir) -> Layout:
    """The layout of ``fastivim run -o OUT_DIR``."""
    return Layout(Path(out_dir))


def check_label(label, what: str) -> str:
    """A BIDS label as the library takes it: letters and digits, without ``sub-``/``ses-``.

    (The command line and config files also accept the prefixed form and strip it: see
    :class:`fastivim.options.RunOptions`.)

    Raises
    ------
    ValueError
        Not letters and digits.
    """
    from ..options import is_bids_label

    if label is None or not is_bids_label(str(label)):
        raise ValueError(f"BIDS {what} label must be ASCII letters and digits (no 'sub-'/'ses-'),"
                         f" got {label!r}")
    return str(label)


def bids_dir(deriv_dir, subject: str, session: str | None = None) -> Path:
    """``DERIV/sub-XX/[ses-YY/]dwi``."""
    d = Path(deriv_dir) / f"sub-{subject}"
    if session:
        d = d / f"ses-{session}"
    return d / "dwi"


#: One BIDS entity of a file name: ``key-label``.
_ENTITY_RE = re.compile(r"^[a-zA-Z]+-[a-zA-Z0-9]+$")


def source_entities(image) -> str:
    """The BIDS entities of a BIDS-named DWI besides ``sub`` and ``ses``, e.g. ``acq-a_dir-AP``.

    ``sub-06_ses-1_acq-a_dir-AP_dwi.nii.gz`` gives ``acq-a_dir-AP``; a name that does not
    look like BIDS (not ``sub-..._dwi.nii[.gz]``) gives ``""``. Outputs keep these entities,
    so two acquisitions of one session never write the same maps.

    Raises
    ------
    ValueError
        A BIDS-looking name with an entity that is not ``key-label`` in ASCII letters and
        digits (``acq-a.b``, ``acq-é``): dropping it would name two series' outputs alike.
    """
    name = Path(image).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    parts = name.split("_")
    if len(parts) < 2 or parts[-1] != "dwi" or not parts[0].startswith("sub-"):
        return ""
    bad = [p for p in parts[:-1] if not _ENTITY_RE.match(p)]
    if bad:  # a BIDS-named image with a broken entity: its outputs could not be told apart
        raise ValueError(f"{image}: invalid BIDS entity {bad[0]!r} in the file name (each must "
                         f"be key-label, ASCII letters and digits: e.g. acq-fast); rename the "
                         f"file")
    return "_".join(p for p in parts[:-1] if not p.startswith(("sub-", "ses-")))


def bids_layout(deriv_dir, subject: str, session: str | None = None,
                entities: str = "") -> Layout:
    """The layout of one series in BIDS derivatives (labels without their prefix).

    ``entities`` (see :func:`source_entities`) go between the session and ``model-ivim``:
    ``sub-06_acq-a_model-ivim_D.nii.gz``.
    """
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "") + (
        f"_{entities}" if entities else "") + f"_{BIDS_ENTITY}_"
    return Layout(bids_dir(deriv_dir, subject, session), prefix, bids=True, root=Path(deriv_dir))


def bids_paths(deriv_dir, subject: str, session: str | None = None) -> list:
    """Every map and sidecar :func:`~fastivim.io.export_bids` writes with the default fit
    options (not the record, nor ``dataset_description.json``)."""
    return bids_layout(deriv_dir, subject, session).map_files(_default_maps())


def map_paths(out_dir) -> list:
    """Every file :func:`~fastivim.io.save_maps` writes into ``out_dir`` with the default fit
    options: maps, sidecars and the record."""
    layout = plain_layout(out_dir)
    return layout.map_files(_default_maps()) + [layout.record]


def _default_maps() -> tuple:
    """The maps of a fit with the default options: the ``ivim`` model's, no optional ones."""
    return tuple(m for m in MAPS if m.produced_by("ivim") and not m.optional)


def layout_of_record(record_path) -> Layout:
    """The layout a run record belongs to: ``fastivim.json`` (plain) or
    ``<prefix>fastivim.json`` (BIDS)."""
    record_path = Path(record_path)
    name = record_path.name
    if name == RECORD_NAME:
        return Layout(record_path.parent)
    if name.endswith(f"_{BIDS_ENTITY}_{RECORD_NAME}"):
        return Layout(record_path.parent, name[: -len(RECORD_NAME)], bids=True)
    raise ValueError(f"{record_path}: not a fastivim run record (expected {RECORD_NAME} or "
                     f"*_{BIDS_ENTITY}_{RECORD_NAME})")
