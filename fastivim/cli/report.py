"""``fastivim report``: the quality-control report of a finished run."""

from __future__ import annotations

import click

from .options import clean_errors, path_type
from .run import write_report


@click.command("report")
@click.argument("out_dir", type=path_type)
@clean_errors
def command(out_dir):
    """Write the quality-control report of a finished run (needs fastivim[report]).

    OUT_DIR is the folder of `fastivim run -o`, or a BIDS series: its
    *_model-ivim_fastivim.json record or the dwi folder that holds it.
    """
    from ..io.read import find_record

    try:
        find_record(out_dir)
    except ValueError:
        raise click.ClickException(f"{out_dir}: no fastivim.json here (not a fastivim run "
                                   f"output)") from None
    write_report(out_dir)
