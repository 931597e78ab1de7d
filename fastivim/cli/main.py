"""The ``fastivim`` command group: version, help, the exact command line, interrupts.

Commands live one per module (:mod:`fastivim.cli.run`, ``report``, ``dump_defaults``,
``simulate``, ``demo``, ``batch``, ``compile``) and only parse options, call the library and
print.
Ctrl-C ends a command with exit status 130 and SIGTERM with 143, after the same clean-up (the
library's ``finally`` blocks run: staged files are removed, a batch writes its summary).
"""

from __future__ import annotations

import signal
import sys
import threading

import click

from .. import __version__
from . import batch, demo, dump_defaults, report, run, simulate
from . import compile as compile_cmd

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

#: Exit status after SIGTERM (128 + SIGTERM).
EXIT_TERMINATED = 143


#: Delay before an interrupt swallowed by a finaliser is delivered again, s.
REDELIVER_SECONDS = 0.01


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that it unwinds exactly like Ctrl-C."""


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
        caught = []  # the signals received, whatever became of the exceptions they raised

        def on_signal(signum, frame):
            caught.append(signum)
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

        def unraisable(info, chain=sys.unraisablehook):
            # an interrupt that lands in a __del__ (garbage collection) is swallowed by Python
            # with a traceback: deliver the signal again from a helper thread, so that it
            # arrives once the finaliser has returned (and ``caught`` ends the command as
            # interrupted even if that one is swallowed too)
            if isinstance(info.exc_value, KeyboardInterrupt):
                signum = signal.SIGTERM if isinstance(info.exc_value, Terminated) else \
                    signal.SIGINT
                threading.Timer(REDELIVER_SECONDS, signal.raise_signal, (signum,)).start()
            else:
                chain(info)

        previous = {}
        hook = sys.unraisablehook
        if in_main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
            sys.unraisablehook = unraisable
        try:
            result = super().invoke(ctx)
            if caught:  # an interrupt that something swallowed
                raise Terminated() if caught[0] == signal.SIGTERM else KeyboardInterrupt()
            return result
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated) or (caught and caught[0] == signal.SIGTERM)
            click.echo(f"fastivim: {'terminated' if terminated else 'interrupted'}", err=True)
            ctx.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
        finally:
            if in_main:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                sys.unraisablehook = hook


@click.group(cls=FastivimGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastivim")
def main():
    """Fast IVIM fitting of multi-b-value diffusion MRI: NIfTI in, parameter maps out.

    S(b) = S0 * (f * exp(-b * D_star) + (1 - f) * exp(-b * D)), b in s/mm², D and D_star in mm²/s.
    """


for _module in (run, compile_cmd, dump_defaults, simulate, demo, report, batch):
    main.add_command(_module.command)
