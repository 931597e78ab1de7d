"""``fastivim simulate``: write a synthetic IVIM phantom with its ground truth."""

from __future__ import annotations

import click

from .options import clean_errors, path_type, shape_opt


def _float_list(ctx, param, value):
    from .._atomic import parse_number

    if value is None:
        return None
    try:
        return [parse_number(x) for x in value.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def _snr(ctx, param, value):
    # FloatRange lets NaN through (every comparison with NaN is false): it would write a
    # noise-free phantom labelled "SNR nan"
    if value != value:
        raise click.BadParameter("must be a number > 0, got nan")
    return value


def write_phantom(out, shape, snr=30.0, seed=0, b_values=None, overwrite=False) -> list:
    """Simulate a phantom (:func:`fastivim.simulate.phantom`) and write it with its truth."""
    from .. import io
    from ..fit import validate_b_values
    from ..simulate import DEFAULT_B_VALUES, phantom

    b = validate_b_values(DEFAULT_B_VALUES if b_values is None else b_values)
    return io.write_phantom(out, phantom(shape, b, snr=snr, seed=seed), overwrite=overwrite)


@click.command("simulate")
@click.argument("out", type=path_type)
@shape_opt("spatial size X,Y,Z")
@click.option("--snr", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, callback=_snr, help="S0 / noise sigma in the tissue")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--b-values", callback=_float_list, metavar="B,B,...",
              help="s/mm² (default: 0,10,20,30,50,80,100,200,400,800)")
@click.option("--overwrite", is_flag=True, help="replace existing files")
@clean_errors
def command(out, shape, snr, seed, b_values, overwrite):
    """Write a synthetic IVIM phantom OUT (.nii.gz), its .bval and <stem>_truth/ maps."""
    files = write_phantom(out, shape, snr, seed, b_values, overwrite)
    click.echo(f"wrote {out} ({'×'.join(map(str, shape))}, SNR {snr:g}), {files[1].name} and "
               f"{files[2].parent.name}/ (ground truth)")
