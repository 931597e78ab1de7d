"""``fastivim dump-defaults``: every run option with its default, as YAML for ``--config``."""

from __future__ import annotations

import click


@click.command("dump-defaults")
def command():
    """Print every run option with its default and a comment, as YAML for --config."""
    from ..config import dump_defaults

    click.echo(dump_defaults(), nl=False)
