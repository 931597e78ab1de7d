"""Writing: maps as NIfTI with JSON sidecars and the run record, all or nothing.

Every map keeps the input's affine, qform/sform codes and spatial units, so it overlays the input
in any viewer. Float maps are stored float32, ``quality_mask`` and ``status`` uint8 (the table
is :data:`fastivim.model.MAPS`; a map the result does not hold is not written).

The outputs of a run in one layout (a plain folder, or one BIDS series) are written by a
:class:`LayoutWriter`, which makes them all-or-nothing:

1. **Lock.** A hidden ``.<record>.lock`` file in the folder is locked (``flock``) for the whole
   run; a second run into the same layout refuses at once with a one-line error. The kernel
   drops the lock of a killed process, so a stale lock file never blocks.
2. **Stage.** Every file is written under a hidden ``.NAME.partial`` name, created with
   ``O_CREAT | O_EXCL | O_NOFOLLOW`` (:func:`fastivim._atomic.write_new`), so a link planted
   there, even during the fit, is never followed. Any failure or interrupt (Ctrl-C, SIGTERM)
   removes the partial files and the folders the run created; partial files a killed run left
   behind are removed by the next run, under the lock. A name the run owns (lock, partial,
   map, sidecar, record, report) that is a symbolic link, a folder or a special file, or a
   BIDS folder below the derivatives folder that is a link, is refused with one line
   (:func:`fastivim._atomic.check_owned`): nothing is written outside the output folder.
3. **Commit**, with Ctrl-C and SIGTERM held back until it is done (a few milliseconds): the
   old run record is deleted first, then every file of the older run that this run does not
   replace (a report, a map this method does not produce), then the staged files are renamed
   into place, and the new record is renamed in last. The record lists every file of the run
   with its size and SHA-256 (``manifest``). Before the first rename every final name is
   checked again and every staged file must still be the one written (same device and inode);
   a run writing two layouts (``-o A --bids B``) stages both before committing either.

So a layout with a record is one complete run: every file the record lists is the one it
describes (:func:`fastivim.io.read.verify_manifest` checks). Without a record it is incomplete
(being written, or a process was killed during the commit) and a later run replaces it.

Output problems raise :class:`OutputError` with a one-line message that names the path.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import signal
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from .._atomic import (
    OutputError,
    check_owned,
    check_real_dirs,
    commit_file,
    create_once,
    json_bytes,
    partial_path,
    write_new,
)
from ..adc import ADC_COLUMNS, ADC_EQUATION, ADC_FIT
from ..kernels.status import STATUS_MEANINGS
from ..model import EQUATION, EQUATIONS, bounds_to_json, maps_of
from .layout import BIDS_VERSION, Layout, bids_layout, check_label, plain_layout
from .read import bval_sidecar, image_stem, load_nifti

#: gzip level of written ``.nii.gz`` files. On 128×128×30 maps level 1 takes 57 ms per float32
#: map (1.00 MB) against 68-78 ms at level 6 (0.98 MB), and 5 ms against 32 ms per uint8 map.
GZIP_LEVEL = 1


def _identity_reference(shape):
    img = nib.Nifti1Image(np.zeros(shape + (1,), dtype=np.float32), np.eye(4))
    img.header.set_xyzt_units("mm")
    return img


def _as_reference(reference_img, shape):
    if reference_img is None:
        return _identity_reference(shape)
    if isinstance(reference_img, (str, os.PathLike)):
        reference_img = load_nifti(reference_img, "reference image")
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


class Staging:
    """Several files that appear together: each is written to its :func:`partial_path`, and all
    are renamed into place at :meth:`commit`.

    Every staging file is created with ``O_EXCL | O_NOFOLLOW`` (:func:`fastivim._atomic.write_new`)
    and every final name is checked (:func:`fastivim._atomic.check_owned`) before the first
    rename: a symbolic link or special file at any of them is refused, never followed. Folders
    below ``root`` that are links are refused too (:func:`fastivim._atomic.check_real_dirs`).

    Used as a context manager: any exception (or interrupt) before the commit removes the
    partial files and the directories this staging created. :class:`LayoutWriter` adds the
    lock, the manifest and the commit order of a run's outputs.
    """

    def __init__(self, root=None):
        self.root = Path(root) if root is not None else None
        self.items = []  # (partial, final, size in bytes, sha256)
        self._identity = {}  # partial -> (st_dev, st_ino) of the file written there
        self._made_dirs = []

    def makedirs(self, d: Path) -> None:
        d = Path(d)
        if self.root is not None:
            check_real_dirs(d, self.root)
        missing = []
        p = d
        while not os.path.lexists(p):
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:  # another writer made it meanwhile: it is not ours
                continue
            self._made_dirs.append(p)
        if self.root is not None:  # again: a link may have been planted meanwhile
            check_real_dirs(d, self.root)

    def write(self, final: Path, payload: bytes) -> None:
        final = Path(final)
        self.makedirs(final.parent)
        check_owned(final)
        partial = partial_path(final)
        identity = write_new(partial, payload, final)
        self.items.append((partial, final, len(payload), _sha256(payload)))
        self._identity[partial] = identity

    def check_finals(self) -> None:
        """Refuse before the first rename when any final name is a link or special file, or a
        staged file is no longer the one written."""
        for partial, final, _, _ in self.items:
            check_owned(final)
            commit_file_check(partial, self._identity.get(partial))

    def commit(self) -> list:
        self.check_finals()
        for partial, final, _, _ in self.items:
            commit_file(partial, final, self._identity.get(partial))
        done = [final for _, final, _, _ in self.items]
        self.items = []
        self._made_dirs = []
        return done

    def abort(self) -> None:
        """Remove the partial files, then the folders this staging created."""
        self.remove_files()
        self.remove_dirs()

    def remove_files(self) -> None:
        for partial, _, _, _ in self.items:
            try:
                partial.unlink()
            except OSError:
                pass
        self.items = []

    def remove_dirs(self) -> None:
        for d in reversed(self._made_dirs):
            try:
                d.rmdir()
            except OSError:  # not empty: something else lives there now
                pass
        self._made_dirs = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            if issubclass(exc_type, OSError) and not isinstance(exc, OutputError):
                raise _cannot_write(exc) from None
        return False


def commit_file_check(staged: Path, identity) -> None:
    """Refuse when ``staged`` is no longer the file :func:`fastivim._atomic.write_new` wrote
    (checked for every file before the first rename of a commit)."""
    if identity is None:
        return
    try:
        st = os.lstat(staged)
        same = (st.st_dev, st.st_ino) == tuple(identity)
    except OSError:
        same = False
    if not same:
        raise OutputError(f"{staged}: the staged file was replaced or removed by another "
                          f"process; nothing of this run was made visible")


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
    for t in targets:  # a link or special file is refused even with overwrite
        check_owned(t)
    if not overwrite:
        for t in targets:
            if t.exists():
                raise OutputError(f"{t}: output exists (use --overwrite to replace it)")
    for d in sorted({t.parent for t in targets}):
        p = d
        while not os.path.lexists(p):
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


def sidecar(info, result) -> dict:
    """The JSON sidecar of one map (a :class:`fastivim.model.MapInfo`) of ``result``."""
    side = {
        "Description": info.description,
        "Units": info.units,
        "Model": EQUATIONS.get(getattr(result, "model", "ivim"), EQUATIONS["ivim"]),
        "FittingMethod": result.method,
        "BValues": [float(v) for v in result.b_values],
        "BThreshold": result.b_threshold,
        "Bounds": bounds_to_json(result.bounds),
        "Software": {"Name": "fastivim", "Version": __version__},
    }
    if info.attr in ADC_COLUMNS:  # a mono-exponential fit beside the IVIM one
        side.update(Model=ADC_EQUATION, FittingMethod=ADC_FIT)
    if info.name == "status":
        side["Levels"] = {str(k): v for k, v in STATUS_MEANINGS.items()}
    if info.name == "quality_mask":
        side["Levels"] = {"0": "failed the quality checks or not fitted", "1": "passed"}
    return side


def encode_maps(result, reference_img) -> list:
    """``[(MapInfo, nii.gz bytes)]`` of every map ``result`` holds; gzip runs in threads (zlib
    releases the GIL)."""
    ref = _as_reference(reference_img, result.shape)

    def one(info):
        data = getattr(result, info.attr)
        img = map_image(data, ref, info.dtype, f"fastivim {__version__} {info.name}")
        return info, nifti_bytes(img)

    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        return list(pool.map(one, maps_of(result)))
    finally:  # on Ctrl-C, do not encode the maps still queued
        pool.shutdown(wait=True, cancel_futures=True)


def dataset_description() -> dict:
    """Content of the derivatives' ``dataset_description.json`` (BIDS, ``GeneratedBy``)."""
    return {
        "Name": "fastivim IVIM parameter maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fastivim", "Version": __version__,
                         "Description": "voxel-wise IVIM fit: " + EQUATION}],
    }


def default_record(result) -> dict:
    """The smallest run record: version, method, bounds and b-values of ``result``."""
    return {"version": __version__, "method": result.method,
            "bounds": bounds_to_json(result.bounds),
            "b_values": [float(v) for v in result.b_values]}


@contextmanager
def deferred_signals(signums=(signal.SIGINT, signal.SIGTERM)):
    """Hold Ctrl-C and SIGTERM back while the block runs, then deliver them.

    For the few milliseconds of a commit, so that an interrupt cannot split it. Only the main
    thread can handle signals; elsewhere (a Dask worker thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)  # Python's Ctrl-C handler, or the CLI's SIGTERM one
            elif handler == signal.SIG_DFL:
                signal.raise_signal(received[0])


class OutputLock:
    """An exclusive, non-blocking lock on a hidden lock file; released when the process dies.

    Raises :class:`OutputError` (one line, naming the folder and the other process) when
    another process holds it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _NO_LOCKING:  # a file system without locks: go on unlocked
                    break
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(
                        f"{self.path.parent}: another fastivim run is writing here{holder}; "
                        f"wait for it or choose another output") from None
                raise
            # the holder before us may have removed the file after we opened it: then our lock
            # is on an orphan and a third process could lock a new file; start again
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd

    def _open(self) -> int:
        """Open (or create) the lock file, never through a link, never a special file, never a
        file with other hard links: the PID written into it must not land anywhere else."""
        import stat

        flags = (os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                 | getattr(os, "O_CLOEXEC", 0))
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{self.path}: is a symbolic link; fastivim never writes "
                                  f"through a link in its output folder (remove it)") from None
            if exc.errno in (errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM):
                check_owned(self.path)
            raise OutputError(f"{self.path}: cannot create the lock file "
                              f"({exc.strerror or exc})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            if st.st_nlink != 1 and stat.S_ISREG(st.st_mode):
                raise OutputError(f"{self.path}: the lock file has other hard links (another "
                                  f"file's name); remove it")
            check_owned(self.path)
            raise OutputError(f"{self.path}: is not a regular file (remove it)")
        os.set_blocking(fd, True)
        return fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: no one else holds it
        finally:
            os.close(self._fd)
            self._fd = None


#: ``flock`` errors of file systems that do not support locks (some network mounts): the run
#: then goes on without the lock (the staging and commit order still hold).
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def _read_holder(fd) -> str:
    try:
        pid, host = os.pread(fd, 200, 0).decode().split()[:2]
        return f" (process {pid} on {host})"
    except (OSError, ValueError, UnicodeDecodeError):
        return ""


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class LayoutWriter:
    """Write one run's files into a :class:`Layout`, all or nothing (see the module docstring).

    Use as a context manager around the whole run (the lock is taken on entry, so a second
    run refuses before it fits)::

        with LayoutWriter(layout, overwrite) as w:
            ...                                   # fit
            w.stage(path, payload)                # every map and sidecar
            w.commit(record)                      # the record, with its manifest, last

    Leaving the block without :meth:`commit` (an error, Ctrl-C, SIGTERM) removes the staged
    files, the lock and the folders it created; the older run, if any, is untouched.
    """

    def __init__(self, layout: Layout, overwrite: bool = False):
        self.layout = layout
        self.overwrite = overwrite
        self.lock = OutputLock(layout.folder / f".{layout.record.name}.lock")
        self._staging = Staging(layout.root if layout.root is not None else layout.folder)
        self.committed = []

    def __enter__(self):
        try:
            self._staging.makedirs(self.layout.folder)
            self.lock.acquire()
            self._remove_stale_partials()
        except BaseException as exc:
            self._cleanup()
            if isinstance(exc, OSError) and not isinstance(exc, OutputError):
                raise _cannot_write(exc) from None
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        self._cleanup()
        if exc_type is not None and issubclass(exc_type, OSError) \
                and not isinstance(exc, OutputError):
            raise _cannot_write(exc) from None
        return False

    def _remove_stale_partials(self) -> None:
        """Partial files of this layout left by a killed run (SIGKILL, power loss); a link or
        special file at one of these names (or at a final name) is refused."""
        for f in self.layout.owned_files():
            check_owned(f)
            p = partial_path(f)
            check_owned(p)
            p.unlink(missing_ok=True)

    def check(self, files) -> None:
        """Under the lock: refuse existing outputs unless overwriting (see
        :func:`check_writable`)."""
        check_writable(files, self.overwrite)

    def stage(self, final: Path, payload: bytes) -> None:
        """Write ``payload`` under the hidden partial name of ``final``."""
        self._staging.write(final, payload)

    def manifest(self) -> dict:
        """``{file name relative to the folder: {"bytes", "sha256"}}`` of the staged files."""
        return {str(final.relative_to(self.layout.folder)): {"bytes": size, "sha256": digest}
                for _, final, size, digest in self._staging.items
                if final.parent == self.layout.folder}

    def prepare(self, record: dict | None) -> None:
        """Stage ``record`` (with the manifest) and check every name the commit will replace
        or remove: after this only renames and unlinks are left."""
        if record is not None:
            self.stage(self.layout.record, json_bytes(dict(record, manifest=self.manifest())))
        self._staging.check_finals()
        for f in self.layout.owned_files():
            check_owned(f)

    def commit(self, record: dict | None = None, prepared: bool = False) -> list:
        """Stage ``record`` (with the manifest) and make the run visible; return the files.

        ``prepared``: :meth:`prepare` was called already (as when several layouts are staged
        first and committed together, see :func:`fastivim.pipeline.write`).
        """
        if not prepared:
            self.prepare(record)
        finals = {final for _, final, _, _ in self._staging.items}
        with deferred_signals():
            self.layout.record.unlink(missing_ok=True)  # from here the layout reads incomplete
            for f in self.layout.owned_files():  # files of the older run not replaced now
                if f not in finals:
                    f.unlink(missing_ok=True)
            # in staging order: the record, staged last, is renamed in last
            self.committed = self._staging.commit()
        return self.committed

    def _cleanup(self) -> None:
        self._staging.remove_files()
        self.lock.release()
        self._staging.remove_dirs()  # after the lock file is gone


def _cannot_write(exc: OSError) -> OutputError:
    path = getattr(exc, "filename", None) or "output"
    return OutputError(f"{path}: cannot write ({exc.strerror or exc})")


def ensure_dataset_description(deriv_dir) -> bool:
    """Create ``DERIV/dataset_description.json`` unless it exists; safe when many runs start at
    once into a fresh derivatives folder (a unique staging name, then a link that fails if
    another run got there first: see :func:`fastivim._atomic.create_once`). Returns True when
    this call wrote it."""
    deriv = Path(deriv_dir)
    try:
        deriv.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{deriv}: cannot create output directory ({exc.strerror or exc})"
                          ) from None
    return create_once(deriv / "dataset_description.json", json_bytes(dataset_description()))


def stage_layout(result, writer: LayoutWriter, encoded, record=None, extra=()) -> None:
    """Check, then stage every map and sidecar of ``result`` and the record into the writer's
    layout (:meth:`LayoutWriter.prepare`); :meth:`LayoutWriter.commit` with ``prepared=True``
    makes them visible."""
    layout = writer.layout
    writer.check(layout.map_files(maps_of(result)) + [layout.record])
    for path, payload in extra:
        writer.stage(path, payload)
    for info, payload in encoded:
        writer.stage(layout.map_file(info), payload)
        writer.stage(layout.sidecar(info), json_bytes(sidecar(info, result)))
    writer.prepare(record)


def write_layout(result, layout: Layout, encoded, record=None, extra=(), overwrite=False,
                 writer: LayoutWriter | None = None, description_root=None) -> list:
    """Write every map and sidecar of ``result`` into ``layout``, then the record; all or
    nothing (see :class:`LayoutWriter`).

    Parameters
    ----------
    result : IVIMResult
    layout : Layout
    encoded : list
        From :func:`encode_maps`.
    record : dict, optional
        Written last as the layout's record, with the ``manifest`` of the files; None: none.
    extra : sequence of (Path, bytes)
        Further files written first.
    overwrite : bool
        Replace an earlier run (otherwise an existing output is an :class:`OutputError`).
    writer : LayoutWriter, optional
        An open writer (locked earlier, e.g. for the whole run); default: one for this call.
    description_root : Path, optional
        BIDS derivatives folder whose ``dataset_description.json`` is created, if missing, just
        before the commit (:func:`ensure_dataset_description`).

    Returns
    -------
    list of Path
        The files written.
    """
    if writer is None:
        with LayoutWriter(layout, overwrite) as w:
            return write_layout(result, layout, encoded, record, extra, overwrite, writer=w,
                                description_root=description_root)
    stage_layout(result, writer, encoded, record, extra)
    made = []
    if description_root is not None and ensure_dataset_description(description_root):
        made.append(Path(description_root) / "dataset_description.json")
    return made + writer.commit(prepared=True)


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
    layout = plain_layout(out_dir)
    check_writable(layout.map_files(maps_of(result)) + [layout.record], overwrite)
    encoded = _encoded if _encoded is not None else encode_maps(result, reference_img)
    return write_layout(result, layout, encoded,
                        record if record is not None else default_record(result),
                        overwrite=overwrite)


def export_bids(result, deriv_dir, subject, session=None, reference_img=None, overwrite=False,
                _encoded=None, record=None) -> list:
    """Write a fit as BIDS derivatives.

    Layout::

        DERIV/dataset_description.json             (written once, kept if present)
        DERIV/sub-<subject>/[ses-<session>/]dwi/
            sub-<subject>_[ses-<session>_]model-ivim_<map>.nii.gz  + .json
            sub-<subject>_[ses-<session>_]model-ivim_fastivim.json   (``record``, last)

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
    record : dict, optional
        The run record, written last (as :func:`fastivim.io.fit_file` does); None writes none.

    Returns
    -------
    list of Path
        The files written.
    """
    subject = check_label(subject, "subject")
    session = check_label(session, "session") if session is not None else None
    layout = bids_layout(deriv_dir, subject, session)
    check_writable(layout.map_files(maps_of(result)) + [layout.record], overwrite)
    encoded = _encoded if _encoded is not None else encode_maps(result, reference_img)
    return write_layout(result, layout, encoded, record, overwrite=overwrite,
                        description_root=deriv_dir)


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
    with Staging() as st:
        raw = img.to_bytes()
        st.write(path, gzip.compress(raw, GZIP_LEVEL, mtime=0) if path.name.endswith(".gz")
                 else raw)
        st.write(bval_sidecar(path), (" ".join(f"{v:g}" for v in ph.b_values) + "\n").encode())
        for n in names:
            dtype = "uint8" if n == "mask" else "float32"
            st.write(truth_dir / f"{n}.nii.gz",
                     nifti_bytes(map_image(truth[n], img, dtype, f"truth {n}")))
        return st.commit()
