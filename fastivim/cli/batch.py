"""``fastivim batch``: every DWI series of a BIDS dataset; the work is :mod:`fastivim.batch`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from .._atomic import one_line
from ..batch import (
    DEFAULT_MASK_PATTERN,
    EXIT_SOME_FAILED,
    closing_summary,
    find_series,
    plan,
    run_batch,
)
from ..options import RunOptions
from .options import (
    b_threshold_opt,
    bounds_opt,
    command_line,
    mask_fraction_opt,
    method_opt,
    model_opt,
    path_type,
    seed_opt,
    uncertainty_opt,
)


@click.command("batch", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bids_root", type=click.Path(path_type=Path, file_okay=False))
@click.option("-o", "--out-dir", "deriv_dir", type=path_type, required=True,
              metavar="DERIV_DIR", help="BIDS derivatives directory to write into")
@click.option("--mask-pattern", default=DEFAULT_MASK_PATTERN, show_default=True,
              metavar="PATTERN",
              help="per-series mask, relative to BIDS_ROOT; placeholders {subject}, {session}, "
                   "{entities}, {dwi_dir}; series without one get the automatic mask")
@mask_fraction_opt
@method_opt
@model_opt
@uncertainty_opt
@seed_opt
@b_threshold_opt
@bounds_opt
@click.option("--threads", type=click.IntRange(min=1), metavar="N",
              help="numba threads per fit [default: all cores; with Dask, cores // worker "
                   "processes of the host]")
@click.option("--workers", type=click.IntRange(min=1), metavar="N",
              help="start a local Dask cluster of N worker processes (fastivim[cluster])")
@click.option("--scheduler", metavar="ADDRESS",
              help="send the series to this existing Dask scheduler, e.g. tcp://host:8786")
@click.option("--redo", is_flag=True, help="refit series whose outputs are complete too")
@click.option("-n", "--dry-run", is_flag=True, help="list the series and what would be done")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
def command(bids_root, deriv_dir, mask_pattern, mask_fraction, method, model, uncertainty, seed,
            b_threshold, bounds, threads, workers, scheduler, redo, dry_run, quiet):
    """Fit every sub-*/[ses-*/]dwi/*_dwi.nii[.gz] of BIDS_ROOT into BIDS derivatives DERIV_DIR.

    Each series needs its .bval beside it. Writes the maps of `fastivim run --bids` per series
    and DERIV_DIR/fastivim_summary.tsv (one row per series). Series that fail are recorded
    there with their error and the others go on (exit status 3 if any failed). A re-run skips
    series whose outputs are complete and redoes the rest.
    """
    if workers is not None and scheduler is not None:
        raise click.UsageError("--workers and --scheduler exclude each other")
    if not bids_root.is_dir():
        raise click.ClickException(f"{bids_root}: no such directory (expected a BIDS dataset)")
    try:
        options = RunOptions.build(method=method, model=model, uncertainty=uncertainty,
                                   seed=seed, b_threshold=b_threshold, bounds=dict(bounds),
                                   mask_fraction=mask_fraction, threads=threads)
        if dry_run:
            lines = plan(bids_root, deriv_dir, options, mask_pattern, redo)
        else:
            found = find_series(bids_root, mask_pattern)
    except ValueError as exc:
        raise click.ClickException(one_line(exc)) from None
    if dry_run:
        _print_plan(bids_root, lines)
        return
    if not found:
        raise click.ClickException(f"{bids_root}: no sub-*/[ses-*/]dwi/*_dwi.nii[.gz] found")
    ctx = click.get_current_context()
    try:
        report = run_batch(bids_root, deriv_dir, options, mask_pattern=mask_pattern,
                           scheduler=scheduler, workers=workers, redo=redo,
                           progress=not quiet, command=command_line())
    except (ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(one_line(exc)) from None
    click.echo(closing_summary(report, Path(bids_root), Path(deriv_dir)))
    if report.failed:
        ctx.exit(EXIT_SOME_FAILED)


def _print_plan(bids_root, lines) -> None:
    if not lines:
        raise click.ClickException(f"{bids_root}: no sub-*/[ses-*/]dwi/*_dwi.nii[.gz] found")
    width = max(len(x[0]) for x in lines)
    for label, action, dwi, mask, problem in lines:
        click.echo(f"{label:<{width}}  {action:<15}  {dwi}  mask: {mask}")
        if problem:
            click.echo(f"{'':<{width}}  {problem}")
    counts = Counter(x[1] for x in lines)
    click.echo(f"{len(lines)} series: " + ", ".join(f"{n} {a}" for a, n in counts.items())
               + " (dry run: nothing written)")
