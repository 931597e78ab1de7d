"""The ``fastivim`` command group: version, help, the exact command line, interrupts.

Commands live one per module (:mod:`fastivim.cli.run`, ``report``, ``dump_defaults``,
``simulate``, ``demo``, ``batch``) and only parse options, call the library and print.
Ctrl-C ends a command with exit status 130 and SIGTERM with 143, after the same clean-up (the
library's ``finally`` blocks run: staged files are removed, a batch writes its summary).
"""

from __future__ import annotations

import signal
import threading

import click

from .. import __version__
from . import batch, demo, dump_defaults, report, run, simulate

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

#: Exit status after SIGTERM (128 + SIGTERM).
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that it unwinds exactly like Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


class FastivimGroup(click.Group):
    """The command group; keeps the arguments for run records and maps interrupts to exit
    statuses 130/143."""

    def make_context(self, info_name, args, parent=None, **extra):
        argv = list(args)
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta["fastivim.argv"] = argv
        return ctx

    def invoke(self, ctx):
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
        try:
            return super().invoke(ctx)
        except Terminated:
            click.echo("fastivim: terminated", err=True)
            ctx.exit(EXIT_TERMINATED)
        except KeyboardInterrupt:
            click.echo("fastivim: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=FastivimGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastivim")
def main():
    """Fast IVIM fitting of multi-b-value diffusion MRI: NIfTI in, parameter maps out.

    S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D)), b in s/mm², D and D_star in mm²/s.
    """


for _module in (run, dump_defaults, simulate, demo, report, batch):
    main.add_command(_module.command)
