"""``fastivim run``: fit one 4D DWI series and print the summary table."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from .._atomic import one_line
from ..options import RunOptions
from .options import (
    b_threshold_opt,
    bounds_opt,
    clean_errors,
    command_line,
    from_table,
    mask_fraction_opt,
    method_opt,
    model_opt,
    note_printer,
    path_type,
    quiet_opt,
    seed_opt,
    threads_opt,
    uncertainty_opt,
    verbose_opt,
)


def _options(ctx, config_file, params) -> RunOptions:
    """Defaults < config file < command line, as one validated :class:`RunOptions`."""
    from .. import config as cfg

    from_file = cfg.load_config(config_file) if config_file is not None else {}
    values = dict(from_file)
    for key, value in params.items():
        if ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE:
            values[key] = {**from_file.get("bounds", {}), **value} if key == "bounds" else value
    return RunOptions.build(values)


@click.command("run")
@click.argument("dwi", type=path_type)
@from_table("--bvals", key="bvals", type=path_type, metavar="FILE")
@from_table("--bvecs", key="bvecs", type=path_type, metavar="FILE")
@from_table("--mask", key="mask", type=path_type, metavar="FILE")
@from_table("--no-mask", key="no_mask", is_flag=True)
@mask_fraction_opt
@method_opt
@model_opt
@uncertainty_opt
@seed_opt
@b_threshold_opt
@bounds_opt
@threads_opt
@from_table("-o", "--out-dir", key="out_dir", type=path_type, metavar="DIR")
@from_table("--overwrite", key="overwrite", is_flag=True)
@from_table("--bids", key="bids", type=path_type, metavar="DERIV_DIR")
@from_table("--subject", key="subject", metavar="LABEL")
@from_table("--session", key="session", metavar="LABEL")
@from_table("--report", key="report", is_flag=True)
@click.option("--config", "config_file", type=path_type, metavar="FILE",
              help="YAML options (see dump-defaults); command-line options win")
@verbose_opt
@quiet_opt
@click.pass_context
@clean_errors
def command(ctx, dwi, config_file, **params):
    """Fit the IVIM model to every voxel of a 4D DWI series DWI (.nii or .nii.gz)."""
    from .. import io
    from ..pipeline import run

    opts = _options(ctx, config_file, params)
    if opts.out_dir is None and opts.bids is None:
        opts = opts.replace(out_dir=Path(f"{io.image_stem(dwi)}_ivim"))
    note = note_printer(opts.quiet)
    record = run(dwi, opts, command=command_line(), note=note)
    where = opts.out_dir if opts.out_dir is not None else record["outputs"]["bids"]
    click.echo(summary_table(record, Path(dwi).name, where))
    if opts.verbose and note is not None:
        from ..kernels.status import STATUS_MEANINGS

        for code, n in sorted(record["voxels"]["status_counts"].items(),
                              key=lambda x: int(x[0])):
            note(f"status {code} ({STATUS_MEANINGS[int(code)]}): {n:,} voxels")
    if opts.report:
        from ..io import bids_layout, source_entities

        target = opts.out_dir if opts.out_dir is not None else bids_layout(
            opts.bids, opts.subject, opts.session, source_entities(dwi)).record
        write_report(target)


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
    load = t.get("load_kernel", 0.0)
    model = record.get("model", "ivim")
    what = record["method"] + (f" fit of the {model} model" if model != "ivim" else " fit")
    lines = [
        f"fastivim {record['version']}: {what} of {name} ({shape}) -> {where}",
        f"  {'':<22}{'median':>10}  IQR (25% – 75%)",
    ]
    for key, label, scale in (("D", "D      [1e-3 mm²/s]", 1e3),
                              ("D_star", "D_star [1e-3 mm²/s]", 1e3), ("f", "f", 1.0),
                              ("ADC", "ADC    [1e-3 mm²/s]", 1e3)):
        if key in s:  # a map absent for the model is left out
            lines.append(f"  {label:<22}{_fmt_range(s[key], scale)}")
    lines += [
        f"  voxels fitted        {vox['fitted']:,} of {vox['total']:,} (mask: "
        f"{record['mask_source'].split(':')[0]})",
        f"  passing quality      {vox['quality']:,} ({pct:.1f}%)",
        f"  wall time            {wall:.2f} s (read {t['read']:.2f}, load kernel "
        f"{load:.2f}, fit {t['fit']:.2f}, write {t['write']:.2f}); "
        f"{vox['fitted'] / max(wall - load, 1e-9):,.0f} voxels/s without the kernel load "
        f"({t['voxels_per_second']:,.0f} in the fit)",
    ]
    return "\n".join(lines)


def write_report(target):
    """Draw the quality-control report of a finished run (``fastivim.report``, extra
    ``fastivim[report]``) and say where it is."""
    try:
        from .. import report

        made = report.report_from_output(target)
    except ImportError as exc:
        text = one_line(exc)
        if "pip install fastivim[report]" not in text:  # not matplotlib's own hint
            text = f"the report could not be drawn ({text}): pip install fastivim[report]"
        raise click.ClickException(text) from None
    if made is not None:
        click.echo(f"report: {made}")
