"""The ``fastivim`` command: parse options, call :mod:`fastivim.io`, print a summary. No maths.

Commands::

    fastivim run DWI [--bvals FILE] [-o DIR | --bids DERIV --subject 01] [...]
    fastivim dump-defaults > config.yaml
    fastivim simulate OUT.nii.gz
    fastivim demo
    fastivim report OUT_DIR

Bad input ends with one line ``Error: <file>: <problem>`` on stderr and exit status 1 (2 for a
malformed command line), never a traceback; nothing is left half-written.
"""

from __future__ import annotations

import functools
import shlex
import sys
import tempfile
import traceback
from pathlib import Path

import click
from click.core import ParameterSource

from . import __version__
from . import config as cfg
from ._atomic import one_line as _one_line
from .model import PARAM_NAMES

#: Shape of the ``fastivim demo`` phantom (X, Y, Z): ~41k voxels, a second or two.
DEMO_SHAPE = (64, 64, 10)


class _Main(click.Group):
    """The command group; remembers its arguments so runs can record the exact command."""

    argv: list = []

    def main(self, args=None, *a, **kw):
        _Main.argv = list(sys.argv[1:] if args is None else args)
        return super().main(args, *a, **kw)


def _command_line() -> str:
    return shlex.join(["fastivim", *_Main.argv])




def _clean_errors(fn):
    """Turn library errors into one-line ``Error: ...`` messages with exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (ValueError, RuntimeError, OSError) as exc:
            # io.InputError/OutputError, config.ConfigError, fit's ValueErrors
            if kwargs.get("verbose", 0) >= 2:
                traceback.print_exc()
            raise click.ClickException(_one_line(exc)) from None
        except Exception as exc:  # a bug: still one line unless asked for the traceback
            if kwargs.get("verbose", 0) >= 2:
                raise
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {_one_line(exc)} (-vv shows the traceback)"
            ) from None

    return wrapper


def _parse_bounds(ctx, param, values):
    """``--bounds KEY=LO,HI`` (repeatable) → ``{KEY: (LO, HI)}``; ``inf`` allowed for HI."""
    out = {}
    for item in values:
        key, sep, rest = item.partition("=")
        key = key.strip()
        parts = rest.split(",")
        if not sep or len(parts) != 2:
            raise click.BadParameter(f"expected KEY=LO,HI, got {item!r}")
        if key not in PARAM_NAMES:
            raise click.BadParameter(f"unknown key {key!r} in {item!r}; keys are "
                                     f"{', '.join(PARAM_NAMES)}")
        try:
            out[key] = (float(parts[0]), float(parts[1]))
        except ValueError:
            raise click.BadParameter(f"{item!r}: LO and HI must be numbers") from None
    return out


def _help(key: str) -> str:
    return cfg.BY_KEY[key].help


def _opt(*decls, key, **kw):
    """A ``click.option`` whose default and help come from :data:`fastivim.config.OPTIONS`."""
    default = cfg.BY_KEY[key].default
    kw.setdefault("help", _help(key))
    if default is not None and not isinstance(default, dict):
        kw.setdefault("default", default)
        kw.setdefault("show_default", not isinstance(default, bool))
    return click.option(*decls, key, **kw)


_path = click.Path(path_type=Path)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastivim")
def main():
    """Fast IVIM fitting of multi-b-value diffusion MRI: NIfTI in, parameter maps out.

    S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D)), b in s/mm², D and D_star in mm²/s.
    """


@main.command()
@click.argument("dwi", type=_path)
@_opt("--bvals", key="bvals", type=_path, metavar="FILE")
@_opt("--bvecs", key="bvecs", type=_path, metavar="FILE")
@_opt("--mask", key="mask", type=_path, metavar="FILE")
@_opt("--no-mask", key="no_mask", is_flag=True)
@_opt("--mask-fraction", key="mask_fraction", type=click.FloatRange(0, 1, max_open=True))
@_opt("--method", key="method", type=click.Choice(["segmented", "full"]))
@_opt("--b-threshold", key="b_threshold", type=click.FloatRange(min=0), metavar="B")
@click.option("--bounds", multiple=True, callback=_parse_bounds, metavar="KEY=LO,HI",
              help="bound of one parameter (repeatable; keys S0, f, D_star, D; D in mm²/s), "
                   "e.g. --bounds f=0,0.5")
@_opt("--threads", key="threads", type=click.IntRange(min=1), metavar="N")
@_opt("-o", "--out-dir", key="out_dir", type=_path, metavar="DIR")
@_opt("--overwrite", key="overwrite", is_flag=True)
@_opt("--bids", key="bids", type=_path, metavar="DERIV_DIR")
@_opt("--subject", key="subject", metavar="LABEL")
@_opt("--session", key="session", metavar="LABEL")
@_opt("--report", key="report", is_flag=True)
@click.option("--config", "config_file", type=_path, metavar="FILE",
              help="YAML options (see dump-defaults); command-line options win")
@_opt("-v", "--verbose", key="verbose", count=True, show_default=False)
@_opt("-q", "--quiet", key="quiet", is_flag=True)
@click.pass_context
@_clean_errors
def run(ctx, dwi, config_file, **params):
    """Fit the IVIM model to every voxel of a 4D DWI series DWI (.nii or .nii.gz)."""
    from . import io

    values = cfg.defaults()
    from_file = cfg.load_config(config_file) if config_file is not None else {}
    values.update(from_file)
    for key, value in params.items():
        if ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE:
            values[key] = {**from_file.get("bounds", {}), **value} if key == "bounds" else value
    v = values
    if v["mask"] is not None and v["no_mask"]:
        raise click.UsageError("--mask and --no-mask exclude each other")
    if v["bids"] is not None and v["subject"] is None:
        raise click.UsageError("--bids needs --subject")
    if v["bids"] is None and (v["subject"] is not None or v["session"] is not None):
        raise click.UsageError("--subject/--session need --bids")
    out_dir = v["out_dir"]
    if out_dir is None and v["bids"] is None:
        out_dir = Path(f"{io.image_stem(dwi)}_ivim")
    if v["report"] and out_dir is None:
        raise click.UsageError("--report needs the plain output directory: add -o DIR")
    quiet, verbose = v["quiet"], v["verbose"]

    def note(msg):
        if not quiet:
            click.echo(f"fastivim: {msg}", err=True)

    record = io.fit_file(
        dwi, bvals=v["bvals"], bvecs=v["bvecs"],
        mask=None if v["no_mask"] else (v["mask"] if v["mask"] is not None else "auto"),
        mask_fraction=v["mask_fraction"], method=v["method"], b_threshold=v["b_threshold"],
        bounds=v["bounds"], out_dir=out_dir, bids=v["bids"], subject=v["subject"],
        session=v["session"], overwrite=v["overwrite"], progress=not quiet,
        threads=v["threads"], command=_command_line(), note=note)
    click.echo(summary_table(record, Path(dwi).name, out_dir or record["outputs"]["bids"]))
    if verbose:
        for code, n in sorted(record["voxels"]["status_counts"].items(), key=lambda x: int(x[0])):
            from .kernels.status import STATUS_MEANINGS

            note(f"status {code} ({STATUS_MEANINGS[int(code)]}): {n:,} voxels")
    if v["report"]:
        _run_report(out_dir)


def _fmt_range(st, scale):
    if st["median"] is None:
        return "         -  (no voxel passed)"
    return (f"{st['median'] * scale:10.4g}  {st['q25'] * scale:.4g} – {st['q75'] * scale:.4g}")


def summary_table(record: dict, name: str, where) -> str:
    """The end-of-run table: medians/IQR in the quality mask, voxel counts, timings."""
    vox, t, s = record["voxels"], record["timings"], record["stats"]
    shape = "×".join(map(str, record["input_shape"]))
    pct = 100.0 * vox["quality"] / vox["fitted"] if vox["fitted"] else 0.0
    wall = t["total"]
    lines = [
        f"fastivim {record['version']}: {record['method']} fit of {name} ({shape}) -> {where}",
        f"  {'':<22}{'median':>10}  IQR (25% – 75%)",
        f"  {'D      [1e-3 mm²/s]':<22}{_fmt_range(s['D'], 1e3)}",
        f"  {'D_star [1e-3 mm²/s]':<22}{_fmt_range(s['D_star'], 1e3)}",
        f"  {'f':<22}{_fmt_range(s['f'], 1.0)}",
        f"  voxels fitted        {vox['fitted']:,} of {vox['total']:,} (mask: "
        f"{record['mask_source'].split(':')[0]})",
        f"  passing quality      {vox['quality']:,} ({pct:.1f}%)",
        f"  wall time            {wall:.2f} s (read {t['read']:.2f}, load kernel "
        f"{t.get('load_kernel', 0.0):.2f}, fit {t['fit']:.2f}, write {t['write']:.2f}); "
        f"{vox['fitted'] / max(wall, 1e-9):,.0f} voxels/s ({t['voxels_per_second']:,.0f} in "
        f"the fit)",
    ]
    return "\n".join(lines)


def _run_report(out_dir):
    """Hook for the quality-control report (``fastivim.report``, extra ``fastivim[report]``)."""
    try:
        from . import report

        made = report.report_from_output(out_dir)
    except ImportError as exc:
        raise click.ClickException(
            f"the report needs fastivim.report and matplotlib ({_one_line(exc)}): "
            f"pip install fastivim[report]") from None
    if made is not None:
        click.echo(f"report: {made}")


@main.command()
@click.argument("out_dir", type=_path)
@_clean_errors
def report(out_dir):
    """Write the quality-control report of a finished run in OUT_DIR (needs fastivim[report])."""
    if not (Path(out_dir) / "fastivim.json").is_file():
        raise click.ClickException(f"{out_dir}: no fastivim.json here (not a fastivim run output)")
    _run_report(out_dir)


@main.command("dump-defaults")
def dump_defaults():
    """Print every run option with its default and a comment, as YAML for --config."""
    click.echo(cfg.dump_defaults(), nl=False)


def _int_tuple(ctx, param, value):
    try:
        shape = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected X,Y,Z integers, got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise click.BadParameter(f"expected three positive integers X,Y,Z, got {value!r}")
    return shape


def _float_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(x) for x in value.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@main.command()
@click.argument("out", type=_path)
@click.option("--shape", default=",".join(map(str, DEMO_SHAPE)), callback=_int_tuple,
              show_default=True, help="spatial size X,Y,Z")
@click.option("--snr", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="S0 / noise sigma in the tissue")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--b-values", callback=_float_list, metavar="B,B,...",
              help="s/mm² (default: 0,10,20,30,50,80,100,200,400,800)")
@click.option("--overwrite", is_flag=True, help="replace existing files")
@_clean_errors
def simulate(out, shape, snr, seed, b_values, overwrite):
    """Write a synthetic IVIM phantom OUT (.nii.gz), its .bval and <stem>_truth/ maps."""
    files = _simulate(out, shape, snr, seed, b_values, overwrite)
    click.echo(f"wrote {out} ({'×'.join(map(str, shape))}, SNR {snr:g}), {files[1].name} and "
               f"{files[2].parent.name}/ (ground truth)")


def _simulate(out, shape, snr, seed, b_values, overwrite):
    from . import io
    from .simulate import DEFAULT_B_VALUES, phantom

    b = DEFAULT_B_VALUES if b_values is None else b_values
    from .fit import validate_b_values

    validate_b_values(b)
    return io.write_phantom(out, phantom(shape, b, snr=snr, seed=seed), overwrite=overwrite)


@main.command()
@click.option("--dir", "work_dir", type=_path, metavar="DIR",
              help="empty or new folder to work in (default: a fresh temporary folder)")
@click.option("--method", type=click.Choice(["segmented", "full"]), default="segmented",
              show_default=True)
@click.option("--shape", default=",".join(map(str, DEMO_SHAPE)), callback=_int_tuple,
              show_default=True, help="phantom size X,Y,Z")
@click.option("-q", "--quiet", is_flag=True, help="no notes on stderr")
@_clean_errors
def demo(work_dir, method, shape, quiet):
    """Simulate a phantom, fit it as `fastivim run` would, and print the error against truth."""
    import numpy as np

    from . import io

    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="fastivim-demo-"))
    elif work_dir.exists() and any(work_dir.iterdir()):
        raise click.ClickException(f"{work_dir}: not empty; the demo needs a fresh folder")
    dwi = work_dir / "phantom.nii.gz"
    _simulate(dwi, shape, 30.0, 0, None, False)
    if not quiet:
        click.echo(f"fastivim demo: phantom written to {dwi}", err=True)
    out_dir = work_dir / "phantom_ivim"
    record = io.fit_file(dwi, method=method, out_dir=out_dir, progress=not quiet,
                         command=_command_line(), note=None if quiet else
                         (lambda m: click.echo(f"fastivim: {m}", err=True)))
    click.echo(summary_table(record, dwi.name, out_dir))

    import nibabel as nib

    truth_dir = work_dir / "phantom_truth"
    tissue = np.asarray(nib.load(truth_dir / "mask.nii.gz").dataobj) > 0
    good = tissue & (np.asarray(nib.load(out_dir / "quality_mask.nii.gz").dataobj) > 0)
    click.echo(f"error against the truth (quality-mask voxels in the phantom, n = {good.sum():,}; "
               f"{(good.sum() / tissue.sum()):.1%} of the tissue)")
    click.echo(f"  {'':<8}{'truth median':>14}{'fit median':>12}{'median |rel. error|':>21}"
               f"{'median rel. bias':>18}")
    for name in ("D", "D_star", "f"):
        est = np.asarray(nib.load(out_dir / f"{name}.nii.gz").dataobj)[good]
        tru = np.asarray(nib.load(truth_dir / f"{name}.nii.gz").dataobj)[good]
        rel = (est - tru) / tru
        click.echo(f"  {name:<8}{np.median(tru):>14.4g}{np.median(est):>12.4g}"
                   f"{np.median(np.abs(rel)):>20.1%} {np.median(rel):>+17.1%}")
    click.echo(f"files: {out_dir}")


def _add_module_commands():
    """Commands kept in modules of their own, added when the module is present (``batch``)."""
    from importlib.util import find_spec

    if find_spec("fastivim.batch") is not None:
        from .batch import batch_command

        main.add_command(batch_command)


_add_module_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
