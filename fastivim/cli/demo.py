"""``fastivim demo``: simulate a phantom, fit it as ``fastivim run`` would, compare with truth."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from ..model import METHODS
from ..options import RunOptions
from .options import clean_errors, command_line, note_printer, path_type, shape_opt
from .run import summary_table

#: SNR and seed of the demo phantom.
DEMO_SNR, DEMO_SEED = 30.0, 0


@click.command("demo")
@click.option("--dir", "work_dir", type=path_type, metavar="DIR",
              help="empty or new folder to work in, kept afterwards (default: a temporary "
                   "folder, removed at the end unless --keep)")
@click.option("--keep", is_flag=True, help="keep the temporary folder and say where it is")
@click.option("--method", type=click.Choice(list(METHODS)),
              default=RunOptions().fit.method, show_default=True)
@shape_opt("phantom size X,Y,Z")
@click.option("-q", "--quiet", is_flag=True, help="no notes on stderr")
@clean_errors
def command(work_dir, keep, method, shape, quiet):
    """Simulate a phantom, fit it as `fastivim run` would, and print the error against truth."""
    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="fastivim-demo-"))
        temporary = not keep
    elif work_dir.exists() and any(work_dir.iterdir()):
        raise click.ClickException(f"{work_dir}: not empty; the demo needs a fresh folder")
    else:
        temporary = False
    try:
        _demo(work_dir, method, shape, quiet)
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    if temporary:
        click.echo("files: removed with their temporary folder (--keep keeps them)")
    else:
        click.echo(f"files: {work_dir / 'phantom_ivim'}")


def _demo(work_dir: Path, method: str, shape, quiet: bool) -> None:
    from .. import io
    from ..pipeline import run
    from ..simulate import DEFAULT_B_VALUES, error_table, phantom

    ph = phantom(shape, DEFAULT_B_VALUES, snr=DEMO_SNR, seed=DEMO_SEED)
    dwi = work_dir / "phantom.nii.gz"
    io.write_phantom(dwi, ph)
    if not quiet:
        click.echo(f"fastivim demo: phantom written to {dwi}", err=True)
    out_dir = work_dir / "phantom_ivim"
    record = run(dwi, RunOptions.build(method=method, out_dir=out_dir, quiet=quiet),
                 command=command_line(), note=note_printer(quiet))
    click.echo(summary_table(record, dwi.name, out_dir))
    result = io.load_output(out_dir)[0]
    good = ph.mask & result.quality_mask
    names = [n for n in ("D", "D_star", "f") if getattr(result, n, None) is not None]
    table = error_table({n: getattr(result, n) for n in names}, ph.truth(), good)
    click.echo(f"error against the truth (quality-mask voxels in the phantom, n = {good.sum():,}; "
               f"{(good.sum() / ph.mask.sum()):.1%} of the tissue)")
    click.echo(f"  {'':<8}{'truth median':>14}{'fit median':>12}{'median |rel. error|':>21}"
               f"{'median rel. bias':>18}")
    for name, e in table.items():
        click.echo(f"  {name:<8}{e['truth_median']:>14.4g}{e['fit_median']:>12.4g}"
                   f"{e['median_abs_rel_error']:>20.1%} {e['median_rel_bias']:>+17.1%}")
