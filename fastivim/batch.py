"""Whole cohorts: find every DWI series of a BIDS dataset, fit each, keep a record of all of them.

``fastivim batch BIDS_ROOT -o DERIV_DIR`` does, for every series it finds, what
``fastivim run DWI --bids DERIV_DIR --subject S [--session T]`` does, and writes one summary table::

    BIDS_ROOT/sub-<S>/[ses-<T>/]dwi/<entities>_dwi.nii[.gz]   + <entities>_dwi.bval beside it
        [+ optional mask, by MASK_PATTERN, default <entities>_desc-brain_mask.nii.gz beside it]
    ─ fit (pipeline.run, as fastivim run --bids) ─>
    DERIV_DIR/sub-<S>/[ses-<T>/]dwi/sub-<S>_[ses-<T>_]model-ivim_<map>.nii.gz + .json   (as run)
    DERIV_DIR/sub-<S>/[ses-<T>/]dwi/sub-<S>_[ses-<T>_]model-ivim_fastivim.json  (run record, last)
    DERIV_DIR/fastivim_summary.tsv + .json       (one row per series: medians, counts, status)

Never losing a subject
    A series that fails (unreadable image, missing or wrong b-values, bad mask...) gets
    ``status = failed`` and its one-line error in the table; the others go on, and the command
    ends with exit status :data:`EXIT_SOME_FAILED`. Every series found appears in the table,
    also after an interrupt (those not reached are ``pending``).

Resuming
    A series is *complete* when its run record ``..._model-ivim_fastivim.json`` exists, was made
    with the same fit options, and every file it lists is the one it describes (size and
    SHA-256, :func:`fastivim.io.read.verify_manifest`). Each series is written all or nothing
    by :class:`fastivim.io.write.LayoutWriter` (locked, staged, the old record deleted first and
    the new one renamed in last), so an interrupted series never counts as done. A re-run
    skips complete series (``fitted = earlier-run`` in the table) and redoes the rest: missing,
    interrupted, failed, made with other fit options or another input path, or from inputs
    whose content changed since (the record keeps the size and SHA-256 of the image, b-values
    and mask). ``--redo`` refits everything. One batch at a time writes into a derivatives
    folder (a lock beside the summary table).

Where it runs, and how many threads
    Default: in this process, one series at a time, each fitted by the parallel numba kernel on
    all cores (``numba.config.NUMBA_NUM_THREADS``, i.e. ``$NUMBA_NUM_THREADS`` or the CPU count;
    ``--threads`` overrides). No nested parallelism: series are not run concurrently.

    ``--workers N`` starts a Dask ``LocalCluster`` of N worker processes (one task slot each);
    ``--scheduler ADDRESS`` sends the series to an existing Dask distributed scheduler. Each
    series is one task; the task reads and writes the files itself, so every worker must see
    BIDS_ROOT and DERIV_DIR at the same paths (a shared filesystem). Threads: a worker process
    fits one series at a time (a process-wide lock, so worker task slots > 1 are safe but do not
    add parallelism), and each fit uses ``max(1, cores_of_host // worker_processes_on_host)``
    numba threads, so that workers × threads ≤ cores on every host (``--threads`` overrides;
    a worker that joins after the start fits with 1 thread).
    Dask is an optional extra: ``pip install 'fastivim[cluster]'``.

This module is library code: :func:`run_batch` and :func:`plan` are called by ``fastivim batch``
(:mod:`fastivim.cli.batch`, which only parses options and prints) and can be called from Python.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from ._atomic import one_line as _one_line
from ._atomic import write_atomic, write_json_atomic
from .options import RunOptions, check_threads

#: Where a series' own mask is looked for (relative to BIDS_ROOT unless absolute); see
#: :func:`find_series`. A missing file means the automatic mask.
DEFAULT_MASK_PATTERN = "{dwi_dir}/{entities}_desc-brain_mask.nii.gz"

#: The summary table in DERIV_DIR (with a BIDS-style ``.json`` data dictionary beside it).
SUMMARY_NAME = "fastivim_summary.tsv"

#: Suffix of the per-series run record, the completion marker: ``sub-01_model-ivim_fastivim.json``.
RECORD_SUFFIX = "fastivim.json"

#: Exit status when the batch ran to the end but some series failed (1: nothing could run,
#: 2: bad command line, as in ``fastivim run``).
EXIT_SOME_FAILED = 3

#: Columns of the summary table, with their description and units (the ``.json`` dictionary).
COLUMNS = {
    "participant_id": ("BIDS subject, sub-<label>", None),
    "session_id": ("BIDS session, ses-<label>, or n/a", None),
    "series": ("the series' BIDS entities (image name before _dwi), as in its output names",
               None),
    "status": ("ok: maps written; failed: see error; pending: not reached (interrupted run)",
               None),
    "fitted": ("this-run: fitted now; earlier-run: complete outputs reused; n/a", None),
    "D_median": ("median of D in the quality mask", "mm^2/s"),
    "D_star_median": ("median of D_star in the quality mask", "mm^2/s"),
    "f_median": ("median of f in the quality mask", None),
    "voxels_total": ("voxels in the image grid", None),
    "voxels_fitted": ("voxels inside the mask (fitted)", None),
    "voxels_quality": ("voxels passing the quality checks (status 0)", None),
    "seconds": ("wall time of the series: read, mask, fit, write", "s"),
    "dwi": ("input image, relative to BIDS_ROOT", None),
    "mask": ("mask used (relative to BIDS_ROOT when inside it), or auto", None),
    "error": ("one-line error of a failed series, or n/a", None),
}

#: How long ``--scheduler ADDRESS`` waits to connect.
SCHEDULER_TIMEOUT = "15s"

#: Scheduler options of the LocalCluster of ``--workers``: no dashboard, and its small HTTP
#: server (health/metrics) on a free loopback port rather than the default 8787.
LOOPBACK_HTTP = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}

_DWI_RE = re.compile(r"^(?P<entities>sub-[^_/]+(?:_[^/]*)?)_dwi\.nii(?:\.gz)?$")
_FIT_LOCK = threading.Lock()


# ------------------------------------------------------------------------------- discovery

@dataclass(frozen=True)
class Series:
    """One DWI series of a BIDS dataset and where its outputs go.

    Attributes
    ----------
    subject, session : str
        Labels without ``sub-``/``ses-`` (session None when the dataset has no sessions).
    dwi : Path
        Absolute path of the image; its b-values are ``<stem>.bval`` beside it.
    mask : Path or None
        The mask found by the mask pattern; None means the automatic mask.
    problem : str or None
        A problem found before fitting (a broken link, two images of one series); the series
        is then reported as failed with this message.
    entities : str
        BIDS entities of the image name besides sub and ses (``acq-a_dir-AP``); they name the
        outputs too (see :func:`fastivim.io.source_entities`).
    """

    subject: str
    session: str | None
    dwi: Path
    mask: Path | None = None
    problem: str | None = None
    entities: str = ""

    @property
    def label(self) -> str:
        """The series' BIDS entities: ``sub-01``, ``sub-01_ses-1`` or ``sub-06_acq-a``."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "") + (
            f"_{self.entities}" if self.entities else "")


def find_series(bids_root, mask_pattern: str = DEFAULT_MASK_PATTERN) -> list:
    """Every ``sub-*/[ses-*/]dwi/*_dwi.nii[.gz]`` under ``bids_root``, sorted.

    Parameters
    ----------
    bids_root : str or Path
    mask_pattern : str
        Path of an optional per-series mask, relative to ``bids_root`` unless absolute, with
        the placeholders ``{subject}``, ``{session}`` (labels; session empty when none),
        ``{entities}`` (the image name before ``_dwi``, e.g. ``sub-01_ses-1_acq-fast``) and
        ``{dwi_dir}`` (the image's folder relative to ``bids_root``, e.g. ``sub-01/ses-1/dwi``).
        Default :data:`DEFAULT_MASK_PATTERN`. Where the file does not exist the series gets the
        automatic mask.

    Returns
    -------
    list of Series
        Sorted by subject, session, file name. Several series that would write the same maps
        (same subject and session) are all returned with a ``problem``.
    """
    from .io import source_entities

    root = Path(bids_root).absolute()
    found = []
    for pattern in ("sub-*/dwi/*_dwi.nii*", "sub-*/ses-*/dwi/*_dwi.nii*"):
        for dwi in root.glob(pattern):
            m = _DWI_RE.match(dwi.name)
            if m is None or dwi.is_dir():
                continue
            rel = dwi.relative_to(root).parts
            subject = rel[0][len("sub-"):]
            session = rel[1][len("ses-"):] if len(rel) == 4 else None
            fields = {"subject": subject, "session": session or "",
                      "entities": m.group("entities"),
                      "dwi_dir": Path(*rel[:-1]).as_posix()}
            try:
                mask = Path(mask_pattern.format(**fields))
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"mask pattern {mask_pattern!r}: unknown placeholder {exc} "
                                 f"(use {{subject}}, {{session}}, {{entities}}, {{dwi_dir}})"
                                 ) from None
            mask = mask if mask.is_absolute() else root / mask
            problem = None
            if not dwi.is_file():  # a link whose target is gone: reported, never skipped
                problem = (f"{dwi}: broken symbolic link (its target {os.readlink(dwi)} does "
                           f"not exist)" if dwi.is_symlink() else f"{dwi}: not a regular file")
            try:
                entities = source_entities(dwi)
            except ValueError as exc:  # a broken entity: reported, never dropped; the raw
                # entities keep its label (and table row) apart from the other series'
                entities = "_".join(p for p in m.group("entities").split("_")
                                    if not p.startswith(("sub-", "ses-")))
                problem = problem or str(exc)
            found.append(Series(subject, session, dwi, mask if mask.is_file() else None,
                                problem, entities))
    found.sort(key=lambda s: (s.subject, s.session or "", s.dwi.name))
    per_target = Counter(s.label for s in found if s.problem is None)
    out = []
    for s in found:
        if per_target[s.label] > 1 and s.problem is None:
            others = [o.dwi.name for o in found if o.label == s.label]
            s = replace(s, problem=f"{s.dwi}: {len(others)} images for the series {s.label} "
                                   f"({', '.join(others)}) would write the same maps; keep one")
        out.append(s)
    return out


# ------------------------------------------------------------------------------- one series

def _layout(series: Series, deriv_dir):
    from .io import bids_layout

    return bids_layout(deriv_dir, series.subject, series.session, series.entities)


def record_path(series: Series, deriv_dir) -> Path:
    """The series' run record (completion marker) in ``deriv_dir``."""
    return _layout(series, deriv_dir).record


def _bvecs_of(series: Series) -> Path | None:
    """The ``<stem>.bvec`` beside the series' image, when there is one."""
    from .io.read import bvec_sidecar

    path = bvec_sidecar(series.dwi)
    return path if path.is_file() else None


def _series_options(series: Series, deriv_dir, options: RunOptions, threads=None) -> RunOptions:
    """The options of ``fastivim run DWI --bids DERIV --subject S [--session T] [--mask M]
    [--bvecs <stem>.bvec]`` (the b-vectors beside the image are recorded when present)."""
    return options.replace(bids=Path(deriv_dir), subject=series.subject, session=series.session,
                           mask=series.mask, no_mask=False, out_dir=None, overwrite=True,
                           quiet=True, threads=threads, bvecs=_bvecs_of(series))


def _reuse_key(series: Series, options: RunOptions) -> dict:
    """What a run of ``series`` records for reuse (:func:`fastivim.pipeline.reuse_key`)."""
    from .io import bval_sidecar
    from .pipeline import reuse_key

    return reuse_key(options, series.dwi, bval_sidecar(series.dwi), _bvecs_of(series),
                     str(series.mask) if series.mask else "auto")


def completed_record(series: Series, deriv_dir, options: RunOptions) -> dict | None:
    """The series' run record if its outputs are complete, made with ``options`` and from the
    same input content (image, b-values, mask: compared by SHA-256), else None.

    Raises
    ------
    fastivim.io.InputError
        The record exists but is malformed (not JSON, a field of the wrong type, no manifest,
        not a regular file...: :func:`fastivim.io.record.read_record`). The batch reports the
        series failed with this one line and goes on; ``--redo`` replaces the record.
    """
    from .io.read import InputError, verify_manifest
    from .io.record import BATCH_FIELDS, check_record, read_record
    from .model import MAPS

    rec_path = record_path(series, deriv_dir)
    if not os.path.lexists(rec_path):
        return None
    record = read_record(rec_path)
    key = _reuse_key(series, options)
    if record.get("settings") != key["settings"]:
        return None
    if record.get("inputs") != key["inputs"]:
        return None  # an input changed since (an edited .bval, a new mask...): refit
    check_record(record, rec_path, need=BATCH_FIELDS)  # what the summary row is made of
    model = record.get("model", "ivim")
    # the uncertainty maps are part of a complete run when it was asked for them
    with_sd = (bool(record.get("uncertainty"))
               or record.get("method") in ("bayesian", "spatial"))
    expected = [m for m in MAPS if m.produced_by(model) and (with_sd or not m.optional)]
    layout = _layout(series, deriv_dir)
    # every map of a complete run is in the record's manifest (one missing there could be
    # another run's) and is the file the manifest describes
    if not all(p.name in record["manifest"] for p in layout.map_files(expected)):
        return None
    try:
        verify_manifest(layout, record)
    except InputError:
        return None
    return record


def _bad_record(series: Series, exc) -> dict:
    """The failed row of a series whose run record is malformed."""
    return _row(series, status="failed",
                error=f"{_one_line(exc)} (fix or remove it, or use --redo)")


def _remove_empty_dirs(d: Path, stop: Path) -> None:
    while d != stop and stop in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


def fit_series(series: Series, deriv_dir, options: RunOptions, threads: int | None = None,
               command: str | None = None) -> dict:
    """Fit one series into ``deriv_dir`` and return its summary row; never raises for bad data.

    The maps and the run record are written by :func:`fastivim.pipeline.run`, exactly as
    ``fastivim run --bids`` writes them: an older output of the series is replaced all or
    nothing (the record last), and partial files of an interrupted attempt are removed.

    Parameters
    ----------
    series : Series
    deriv_dir : str or Path
    options : RunOptions
        Fit options and mask fraction (inputs, outputs and threads are set per series).
    threads : int, optional
        numba threads for this fit (None: leave the current setting).
    command : str, optional
        Recorded as the command line.

    Returns
    -------
    dict
        A row of the summary table (see :data:`COLUMNS`), plus ``label``.
    """
    from .pipeline import run

    t0 = time.perf_counter()
    deriv_dir = Path(deriv_dir).absolute()
    if series.problem is not None:
        return _row(series, status="failed", error=series.problem)
    layout = _layout(series, deriv_dir)
    out = layout.folder
    try:
        with _FIT_LOCK:  # one fit per process: task slots never multiply the numba threads
            # the run replaces an older output of the series all or nothing, record last (see
            # fastivim.io.write.LayoutWriter); until then the older one stays whole
            record = run(series.dwi, _series_options(series, deriv_dir, options, threads),
                         command=command)
    except Exception as exc:
        # never above sub-XX when there are sessions: a sibling session may be writing there
        _remove_empty_dirs(out, out.parent.parent if series.session else deriv_dir)
        known = isinstance(exc, (ValueError, RuntimeError, OSError))
        msg = _one_line(exc) if known else f"unexpected {type(exc).__name__}: {_one_line(exc)}"
        return _row(series, status="failed", error=msg, seconds=time.perf_counter() - t0)
    return _row_from_record(series, record, fitted="this-run")


def _row(series: Series, status: str, error=None, fitted=None, seconds=None) -> dict:
    row = {k: None for k in COLUMNS}
    row.update(participant_id=f"sub-{series.subject}",
               session_id=f"ses-{series.session}" if series.session else None,
               series=series.label,
               status=status, fitted=fitted, seconds=seconds, error=error,
               dwi=str(series.dwi), mask=str(series.mask) if series.mask else "auto")
    row["label"] = series.label
    return row


def _row_from_record(series: Series, record: dict, fitted: str) -> dict:
    row = _row(series, status="ok", fitted=fitted, seconds=record["timings"].get("total"))
    for name in ("D", "D_star", "f"):  # D_star is absent for the simplified model
        row[f"{name}_median"] = record["stats"].get(name, {}).get("median")
    vox = record["voxels"]
    row.update(voxels_total=vox["total"], voxels_fitted=vox["fitted"],
               voxels_quality=vox["quality"])
    return row


# ------------------------------------------------------------------------------- the table

def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return repr(value)
    return " ".join(str(value).split())  # one line, no tabs


def write_summary(rows, deriv_dir, bids_root) -> Path:
    """Write :data:`SUMMARY_NAME` (tab-separated, ``n/a`` for missing) and its ``.json``.

    Written atomically (a temporary file renamed into place). Paths inside ``bids_root`` are
    written relative to it.
    """
    deriv_dir = Path(deriv_dir)
    root = Path(bids_root).absolute()
    deriv_dir.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(COLUMNS)]
    for row in rows:
        row = dict(row, seconds=None if row.get("seconds") is None else round(row["seconds"], 3))
        for k in ("dwi", "mask"):  # relative to the dataset where inside it
            p = Path(row[k]) if row.get(k) not in (None, "auto") else None
            if p is not None and root in p.parents:
                row[k] = p.relative_to(root).as_posix()
        lines.append("\t".join(_cell(row.get(k)) for k in COLUMNS))
    path = deriv_dir / SUMMARY_NAME
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    side = {k: ({"Description": d, "Units": u} if u else {"Description": d})
            for k, (d, u) in COLUMNS.items()}
    write_json_atomic(path.with_suffix(".json"), side)
    return path


def read_summary(path) -> list:
    """The rows of a summary table as dicts of strings (``n/a`` kept as is)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:] if line]


# ------------------------------------------------------------------------------- the batch

def available_cores() -> int:
    """CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _dask_fit(series, deriv_dir, options, threads_by_worker, command):
    """The Dask task: pick this worker's thread count, then :func:`fit_series`."""
    from distributed import get_worker

    threads = threads_by_worker.get(get_worker().address, 1)
    import numba

    return fit_series(series, deriv_dir, options,
                      threads=min(threads, numba.config.NUMBA_NUM_THREADS), command=command)


def _numba_thread_limit() -> int:
    """The most numba threads this process can run (``NUMBA_NUM_THREADS``)."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


def _worker_threads(client, threads=None) -> dict:
    """``{worker address: numba threads}`` each worker will really use: workers × threads ≤
    cores on each host, and never more than the worker's numba allows (a ``threads`` above it
    is capped there, so the summary reports what ran, not what was asked)."""
    workers = client.scheduler_info(n_workers=-1)["workers"] if _accepts_n_workers(client) \
        else client.scheduler_info()["workers"]
    limit = client.run(_numba_thread_limit)
    if threads is not None:
        return {addr: max(1, min(threads, limit.get(addr, 1))) for addr in workers}
    cores = client.run(available_cores)
    per_host = Counter(info.get("host") for info in workers.values())
    return {addr: max(1, min(cores.get(addr, 1) // per_host[info.get("host")],
                             limit.get(addr, 1)))
            for addr, info in workers.items()}


def _accepts_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def _connect(scheduler, workers):
    """A Dask client (and the LocalCluster it owns, or None)."""
    try:
        import logging

        from distributed import Client, LocalCluster
    except ImportError:
        raise RuntimeError("--scheduler/--workers need Dask distributed: "
                           "pip install 'fastivim[cluster]'") from None
    if scheduler is not None:
        try:
            return Client(scheduler, timeout=SCHEDULER_TIMEOUT), None
        except (OSError, TimeoutError, ValueError) as exc:
            raise RuntimeError(f"cannot reach the Dask scheduler at {scheduler} "
                               f"({_one_line(exc)})") from None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address=None,
                           scheduler_kwargs=LOOPBACK_HTTP, silence_logs=logging.ERROR)
    return Client(cluster), cluster


@dataclass
class BatchReport:
    """What a batch did: the rows of the table, counts and wall time."""

    rows: list
    summary_path: Path | None
    seconds: float
    fitted: int = 0
    reused: int = 0
    failed: int = 0
    pending: int = 0
    where: str = "this process"
    threads: str = ""
    startup_seconds: float = 0.0

    @property
    def subjects_per_minute(self) -> float:
        """Series fitted (ok or failed) in this run per minute of wall time (with start-up)."""
        return 60.0 * (self.fitted + self.failed) / max(self.seconds, 1e-9)


def run_batch(bids_root, deriv_dir, options: RunOptions | None = None, *,
              mask_pattern=DEFAULT_MASK_PATTERN, scheduler=None, workers=None, redo=False,
              progress=False, command=None) -> BatchReport:
    """Fit every series of a BIDS dataset into BIDS derivatives; write the summary table.

    Parameters
    ----------
    bids_root, deriv_dir : str or Path
    options : RunOptions, optional
        Fit options, mask fraction and ``threads``: numba threads per fit (default: all cores
        locally, cores // workers per host on Dask). Inputs and outputs are set per series.
    mask_pattern : str
        See :func:`find_series`.
    scheduler : str, optional
        Address of an existing Dask scheduler (``tcp://host:8786``).
    workers : int, optional
        Start a Dask LocalCluster of this many worker processes.
    redo : bool
        Refit complete series too.
    progress : bool
        A tqdm bar over series on stderr.
    command : str, optional
        Recorded in every run record.

    Returns
    -------
    BatchReport
    """
    import numba

    options = options or RunOptions()
    threads = options.threads
    if scheduler is None and workers is None:
        check_threads(threads)  # before any work
    local_threads = numba.config.NUMBA_NUM_THREADS if threads is None else threads
    root = Path(bids_root).absolute()
    deriv = Path(deriv_dir).absolute()
    series = find_series(root, mask_pattern)
    rows = {s.label: _row(s, status="pending") for s in series}
    todo = []
    n_reused = 0
    n_bad = 0
    for s in series:
        try:
            rec = None if redo or s.problem is not None else completed_record(s, deriv, options)
        except ValueError as exc:  # a malformed record: this series fails, the others go on
            rows[s.label] = _bad_record(s, exc)
            n_bad += 1
            continue
        if rec is not None:
            rows[s.label] = _row_from_record(s, rec, fitted="earlier-run")
            n_reused += 1
        else:
            todo.append(s)
    t0 = time.perf_counter()
    client = cluster = tbw = None
    bar = None
    report = BatchReport(rows=[], summary_path=None, seconds=0.0, reused=n_reused,
                         failed=n_bad)
    started = not todo  # the table is (re)written once fitting has begun, or nothing is to do
    lock = None
    made_deriv = False
    try:
        if todo:  # one batch at a time into a derivatives folder
            from .io.write import OutputLock

            made_deriv = not os.path.lexists(deriv)
            deriv.mkdir(parents=True, exist_ok=True)
            lock = OutputLock(deriv / f".{SUMMARY_NAME}.lock")
            lock.acquire()
        if todo and (scheduler is not None or workers is not None):
            client, cluster = _connect(scheduler, workers)
            tbw = _worker_threads(client, threads)
            report.startup_seconds = time.perf_counter() - t0
            report.where = (f"Dask scheduler {scheduler}" if scheduler is not None
                            else f"Dask LocalCluster of {workers} worker processes")
            report.threads = _describe_threads(tbw)
            if threads is not None and any(t < threads for t in tbw.values()):
                report.threads += f" ({threads} asked for, capped at the workers' cores)"
        else:
            threads = local_threads
            report.threads = f"{threads} numba thread{'s' * (threads > 1)}, one series at a time"
        if todo:
            _ensure_dataset_description(deriv)
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), unit="subject", file=sys.stderr, dynamic_ncols=True,
                       desc="fastivim batch")
        started = True
        for row in _execute(todo, deriv, options, threads, command, client, tbw):
            rows[row["label"]] = row
            if row["status"] == "failed":
                report.failed += 1
            else:
                report.fitted += 1
            if bar is not None:
                bar.update(1)
                if report.failed:
                    bar.set_postfix(failed=report.failed)
    finally:
        if bar is not None:
            bar.close()
        report.seconds = time.perf_counter() - t0
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        report.rows = list(rows.values())
        report.pending = sum(r["status"] == "pending" for r in report.rows)
        if series and started:
            report.summary_path = write_summary(report.rows, deriv, root)
        if lock is not None:
            lock.release()
        if made_deriv and report.summary_path is None:  # e.g. the scheduler was unreachable
            try:
                deriv.rmdir()  # only if still empty
            except OSError:
                pass
    return report


def _describe_threads(tbw: dict) -> str:
    counts = Counter(tbw.values())
    return ", ".join(f"{n} worker{'s' * (n > 1)} × {t} numba thread{'s' * (t > 1)}"
                     for t, n in sorted(counts.items()))


def _execute(todo, deriv, options, threads, command, client, threads_by_worker):
    """Yield the row of every series in ``todo`` as it finishes."""
    if client is None:
        for s in todo:
            yield fit_series(s, deriv, options, threads=threads, command=command)
        return
    from distributed import as_completed

    futures = {client.submit(_dask_fit, s, deriv, options, threads_by_worker, command,
                             pure=False, key=f"fastivim-{s.label}-{os.urandom(4).hex()}"): s
               for s in todo}
    try:
        for fut in as_completed(futures):
            s = futures[fut]
            try:
                yield fut.result()
            except Exception as exc:  # the worker died, the task was lost...
                yield _row(s, status="failed",
                           error=f"Dask task failed: {type(exc).__name__}: {_one_line(exc)}")
    finally:
        client.cancel(list(futures))


def _ensure_dataset_description(deriv: Path) -> None:
    """Write ``dataset_description.json`` once, before any series (race-free: see
    :func:`fastivim.io.write.ensure_dataset_description`)."""
    from .io.write import ensure_dataset_description

    ensure_dataset_description(deriv)


# ------------------------------------------------------------------------------- planning

def plan(bids_root, deriv_dir, options: RunOptions | None = None,
         mask_pattern: str = DEFAULT_MASK_PATTERN, redo: bool = False) -> list:
    """What :func:`run_batch` would do, writing nothing (``fastivim batch --dry-run``).

    Returns
    -------
    list of tuple
        ``(label, action, dwi, mask, problem)`` per series: action ``fit``,
        ``skip (complete)`` or ``fail``; dwi and mask relative to ``bids_root`` where inside it.
    """
    options = options or RunOptions()
    root = Path(bids_root).absolute()
    lines = []
    for s in find_series(root, mask_pattern):
        problem = s.problem
        if problem is not None:
            action = "fail"
        else:
            try:
                done = not redo and completed_record(s, deriv_dir, options) is not None
                action = "skip (complete)" if done else "fit"
            except ValueError as exc:  # a malformed record
                action, problem = "fail", _bad_record(s, exc)["error"]
        mask = s.mask.relative_to(root).as_posix() if s.mask and root in s.mask.parents else (
            str(s.mask) if s.mask else "auto")
        lines.append((s.label, action, s.dwi.relative_to(root).as_posix(), mask, problem))
    return lines


def closing_summary(report: BatchReport, bids_root: Path, deriv_dir: Path) -> str:
    """The end-of-batch text: counts, failures with their errors, rate, where the table is."""
    n = len(report.rows)
    ran = report.fitted + report.failed
    lines = [f"fastivim batch: {n} series in {bids_root} -> {deriv_dir}",
             f"  fitted now    {report.fitted}",
             f"  reused        {report.reused} (complete from an earlier run)",
             f"  failed        {report.failed}"]
    for r in report.rows:
        if r["status"] == "failed":
            lines.append(f"    {r['label']}: {r['error']}")
    if report.pending:
        lines.append(f"  not reached   {report.pending}")
    if ran:
        start = (f", of which {report.startup_seconds:.1f} s Dask start-up"
                 if report.startup_seconds else "")
        lines.append(f"  wall time     {report.seconds:.1f} s for {ran} series{start} "
                     f"({report.subjects_per_minute:.1f} subjects/min)")
        lines.append(f"  ran on        {report.where}: {report.threads}")
    if report.summary_path is not None:
        lines.append(f"  summary       {report.summary_path}")
    return "\n".join(lines)


__all__ = ["DEFAULT_MASK_PATTERN", "EXIT_SOME_FAILED", "SUMMARY_NAME", "BatchReport", "Series",
           "closing_summary", "completed_record", "find_series", "fit_series", "plan",
           "read_summary", "record_path", "run_batch", "write_summary"]
