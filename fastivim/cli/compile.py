"""``fastivim compile``: compile the kernels ahead of time (image builds, CI, cluster workers)."""

from __future__ import annotations

import click

from ..model import METHODS
from .options import clean_errors, note_printer


@click.command("compile")
@click.option("--method", "methods", multiple=True, type=click.Choice(list(METHODS)),
              help="compile this method's kernels (repeatable; default: every method and "
                   "option)")
@click.option("--uncertainty", is_flag=True,
              help="with --method: also the uncertainty maps' kernel")
@click.option("--simplified", is_flag=True,
              help="with --method: also the simplified model's kernel (--model simplified)")
@click.option("-q", "--quiet", is_flag=True, help="no notes on stderr")
@clean_errors
def command(methods, uncertainty, simplified, quiet):
    """Compile fastivim's kernels now, once per machine, so that no run waits for it.

    numba keeps the compiled code in its cache: NUMBA_CACHE_DIR if set (use the same value for
    the runs that follow, e.g. a folder on a cluster's shared disk), else __pycache__ beside
    the installed sources. Run it where a machine is set up: a container image build, a CI
    job's set-up step, a cluster worker's start. Already compiled kernels load in a moment.
    """
    from ..compiling import TARGETS, compile_kernels, compile_notes

    if methods:
        targets = tuple(methods) + (("uncertainty",) if uncertainty else ()) + (
            ("simplified",) if simplified else ())
    else:
        targets = TARGETS
    with compile_notes(note_printer(quiet)):
        seconds = compile_kernels(targets)
    for target, s in seconds.items():
        click.echo(f"{target:<12} ready in {s:6.2f} s")
