"""One ``fastivim run``: resolve inputs → fit → record → write. No Click, no printing.

::

    dwi.nii[.gz] + bvals (+ mask) ─ resolve_inputs ─> Inputs ─ fit ─> IVIMResult
        ─ make_record ─> dict ─ write ─> plain folder and/or BIDS series (maps, sidecars, record)

:func:`run` takes a :class:`fastivim.options.RunOptions` (built once by the caller: the command
line, a config file, a batch, or :func:`fastivim.io.fit_file`) and returns the run record, the
dict also written as ``fastivim.json``. Notes for the user (e.g. which b-value file was used)
go to the ``note`` callable; nothing is printed here. numba's thread count is set for the call
only and restored afterwards.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .compiling import compile_notes
from .fit import fit_ivim, load_kernel
from .io.layout import Layout, bids_layout, plain_layout, source_entities
from .io.read import (
    AUTO_MASK_PERCENTILE,
    DWI,
    InputError,
    auto_mask,
    input_fingerprints,
    load_dwi,
    load_mask,
)
from .io.write import (
    LayoutWriter,
    OutputError,
    check_writable,
    deferred_signals,
    encode_maps,
    ensure_dataset_description,
    stage_layout,
)
from .model import MAPS
from .options import RunOptions, check_threads

#: A progress bar is shown only when at least this many voxels are fitted.
PROGRESS_MIN_VOXELS = 1 << 16


@dataclass
class Inputs:
    """What a run fits: the series, the mask and where each came from."""

    dwi: DWI
    mask: np.ndarray | None
    mask_source: str

    @property
    def n_fit(self) -> int:
        """Voxels inside the mask."""
        return int(self.mask.sum()) if self.mask is not None else int(
            np.prod(self.dwi.spatial_shape))


def output_layouts(options: RunOptions, dwi=None) -> list:
    """The layouts a run writes: the plain folder (``out_dir``) and/or the BIDS series (named
    with the entities of a BIDS-named ``dwi``, see :func:`fastivim.io.source_entities`)."""
    layouts = []
    if options.out_dir is not None:
        layouts.append(plain_layout(options.out_dir))
    if options.bids is not None:
        layouts.append(bids_layout(options.bids, options.subject, options.session,
                                   source_entities(dwi) if dwi is not None else ""))
    if not layouts:
        raise ValueError("nothing to write: give out_dir or bids")
    return layouts


@contextmanager
def numba_threads(threads: int | None):
    """Run the block on ``threads`` numba threads (None: leave them), then restore the
    caller's setting: a library call must not change the process-wide count."""
    import numba

    before = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(check_threads(threads))
    try:
        yield numba.get_num_threads()
    finally:
        numba.set_num_threads(before)


def resolve_inputs(dwi, options: RunOptions, note=None) -> Inputs:
    """Load the series and its b-values, and make or read the mask.

    Raises
    ------
    InputError
        One line naming the file (see :func:`fastivim.io.load_dwi`, :func:`~fastivim.io.load_mask`);
        also an automatic mask that is empty.
    """
    d = load_dwi(dwi, bvals=options.bvals, bvecs=options.bvecs, fit=options.fit)
    if d.bvals_from_sidecar and note is not None:
        note(f"using b-values from {d.bvals_path}")
    mode = options.mask_mode
    if mode is None:
        return Inputs(d, None, "none")
    if isinstance(mode, str) and mode == "auto":
        mask, thr = auto_mask(d.data, d.b_values, options.mask_fraction)
        if not mask.any():
            raise InputError(f"{d.path}: the automatic mask is empty (no signal in the "
                             f"lowest-b image); pass --mask FILE or --no-mask")
        return Inputs(d, mask, f"auto: lowest-b signal > {options.mask_fraction:g} x its "
                               f"{AUTO_MASK_PERCENTILE:g}th percentile ({thr:.6g})")
    return Inputs(d, load_mask(mode, d.img), str(Path(mode).absolute()))


def load_kernel_noting(fit, note=None) -> float:
    """:func:`fastivim.fit.load_kernel` for the fit options ``fit``, with every compile it
    causes reported to ``note`` (what, once per machine, the measured seconds: see
    :mod:`fastivim.compiling`); None reports nowhere. Returns seconds."""
    t0 = time.perf_counter()
    with compile_notes(note):
        load_kernel(fit.method, fit.model, fit.uncertainty)
    return time.perf_counter() - t0


def reuse_key(options: RunOptions, dwi, bvals=None, bvecs=None, mask_source="auto") -> dict:
    """What a later run (``fastivim batch`` resuming) compares to decide whether outputs can be
    reused: ``settings`` (fit options, mask settings, input path) and ``inputs`` (size and
    SHA-256 of every input file: an edited ``.bval`` means a refit).

    ``mask_source`` is a mask file's path, ``"none"``, or ``"auto..."`` for the automatic mask.
    Both keys go into the run record; the batch builds the same dict for a series and compares.
    """
    auto = mask_source.startswith("auto")
    mask_file = None if auto or mask_source == "none" else mask_source
    return {
        "settings": {**options.fit.as_json(), "mask_fraction": options.mask_fraction,
                     "dwi": str(dwi), "mask": "auto" if auto else mask_source},
        "inputs": input_fingerprints(dwi, bvals, bvecs, mask_file),
    }


def make_record(inputs: Inputs, result, options: RunOptions, layouts, command, timings,
                threads) -> dict:
    """The run record (``fastivim.json``): what was fitted, how, with what result and time."""
    d = inputs.dwi
    plain = next((lay for lay in layouts if not lay.bids), None)
    bids = next((lay for lay in layouts if lay.bids), None)
    return {
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
        **options.fit.as_json(),
        # the bayesian method's prior ("empirical" or "weak") and noise estimate
        "prior": result.prior,
        "noise_sigma": result.noise_sigma,
        "mask_source": inputs.mask_source,
        "threads": threads,
        **reuse_key(options, d.path, d.bvals_path, d.bvecs_path, inputs.mask_source),
        **result.summary(),
        "outputs": {"out_dir": str(plain.folder.absolute()) if plain else None,
                    "bids": str(bids.folder.absolute()) if bids else None},
        "timings": timings,
    }


def write(result, inputs: Inputs, record: dict, writers, options: RunOptions) -> list:
    """Write the maps, sidecars and record into every layout, all or nothing (see
    :class:`fastivim.io.write.LayoutWriter`); return the files written.

    Every layout is checked and staged first; only then is any of them committed, so a problem
    with the second one (``run -o A --bids B``: a link in B, a full disk) leaves A untouched.
    """
    encoded = encode_maps(result, inputs.dwi.img)
    for w in writers:
        stage_layout(result, w, encoded, record)
    written = []
    if any(w.layout.bids for w in writers) and ensure_dataset_description(options.bids):
        written.append(Path(options.bids) / "dataset_description.json")
    with deferred_signals():  # the commits of both layouts, not split by an interrupt
        for w in writers:
            written += w.commit(prepared=True)
    return written


def _all_files(layout: Layout) -> list:
    return layout.map_files(MAPS) + [layout.record]


def input_paths(dwi, options: RunOptions) -> dict:
    """``{path: what}`` of every file a run reads (image, b-values, b-vectors, mask)."""
    from .io.read import bval_sidecar

    paths = {Path(dwi): "the input image"}
    bvals = options.bvals
    if bvals is None:
        paths[bval_sidecar(dwi)] = "the b-value file"
    elif isinstance(bvals, (str, os.PathLike)):
        paths[Path(bvals)] = "the b-value file"
    if options.bvecs is not None:
        paths[Path(options.bvecs)] = "the b-vector file"
    if options.mask is not None and not options.no_mask:
        paths[Path(options.mask)] = "the mask"
    return paths


def check_inputs_are_not_outputs(dwi, options: RunOptions, layouts) -> None:
    """Refuse a run that would write over one of its own inputs (e.g. ``-o .`` beside a DWI
    named ``D.nii.gz``), with or without ``--overwrite``.

    Raises
    ------
    OutputError
        One line naming the file.
    """
    inputs = {os.path.realpath(p): (p, what) for p, what in input_paths(dwi, options).items()}
    for layout in layouts:
        for f in layout.owned_files():
            hit = inputs.get(os.path.realpath(f))
            if hit is None and f.exists():  # hard links, bind mounts
                hit = next((v for k, v in inputs.items() if os.path.exists(k)
                            and os.path.samefile(k, f)), None)
            if hit is not None:
                raise OutputError(f"{hit[0]}: is {hit[1]} of this run and would be replaced "
                                  f"by an output; write the outputs elsewhere (-o DIR)")


def voxel_sizes(img) -> tuple:
    """Voxel size (mm) along each of the three spatial axes: the lengths of the affine's first
    three columns (what the spatial method's neighbourhood in mm is measured in)."""
    a = np.asarray(img.affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a * a).sum(axis=0)))


def run(dwi, options: RunOptions, *, command=None, note=None) -> dict:
    """Fit one 4D image and write its outputs; return the run record.

    Parameters
    ----------
    dwi : str or Path
        4D NIfTI (see :func:`fastivim.io.load_dwi`).
    options : RunOptions
        Inputs (b-values, mask), fit options, threads, outputs; ``quiet`` turns the progress
        bar off (it is shown only for volumes of 65,536 voxels or more).
    command : str, optional
        Recorded as ``command`` (default: this process's argv).
    note : callable, optional
        Called with one-line notes for the user (e.g. the b-value sidecar that was used).

    Returns
    -------
    dict
        The run record: ``version``, ``input``, ``command``, ``method``, ``bounds``,
        ``b_values``, ``mask_source``, ``voxels``, ``stats``, ``timings`` (seconds: read,
        mask, load_kernel, fit, write, total), ``files``, ... The ``write`` and ``total``
        saved in the files stop before the maps are encoded and written; the returned record
        includes the writing too.

    Raises
    ------
    InputError, OutputError
        One-line messages naming the file; nothing is written.
    ValueError
        Invalid options.
    """
    t_start = time.perf_counter()
    layouts = output_layouts(options, dwi)
    check_inputs_are_not_outputs(dwi, options, layouts)
    for layout in layouts:  # before a large image is read
        check_writable(_all_files(layout), options.overwrite)
    with numba_threads(options.threads) as threads, ExitStack() as stack:
        inputs = resolve_inputs(dwi, options, note)
        # lock every output now: a second run into the same place refuses before it fits
        writers = [stack.enter_context(LayoutWriter(layout, options.overwrite))
                   for layout in layouts]
        for w in writers:  # again under the lock: another run may have finished meanwhile
            w.check(_all_files(w.layout))
        t_inputs = time.perf_counter()
        # the compiled kernel's one-off load (or first compile) is timed on its own, so "fit"
        # measures fitting
        t_load = load_kernel_noting(options.fit, note)
        t_fit0 = time.perf_counter()
        fit = options.fit
        with compile_notes(note):  # nothing should compile here: load_kernel did
            result = fit_ivim(inputs.dwi.data, inputs.dwi.b_values, mask=inputs.mask,
                              method=fit.method, bounds=fit.bounds,
                              b_threshold=fit.b_threshold, model=fit.model,
                              uncertainty=fit.uncertainty, seed=fit.seed,
                              progress=not options.quiet
                              and inputs.n_fit >= PROGRESS_MIN_VOXELS,
                              voxel_sizes=voxel_sizes(inputs.dwi.img))
        t_fit = time.perf_counter()
        timings = {"read": inputs.dwi.read_seconds,
                   "mask": t_inputs - t_start - inputs.dwi.read_seconds,
                   "load_kernel": t_load, "fit": t_fit - t_fit0,
                   "voxels_per_second": inputs.n_fit / max(t_fit - t_fit0, 1e-9)}
        record = make_record(inputs, result, options, layouts, command, timings, threads)
        t_end = time.perf_counter()
        timings.update(write=t_end - t_fit, total=t_end - t_start)
        files = write(result, inputs, record, writers, options)
    t_end = time.perf_counter()
    record["timings"] = dict(timings, write=t_end - t_fit, total=t_end - t_start)
    record["files"] = [str(p) for p in files]
    return record
