"""Options shared by the commands, in the style of rasterio's ``rio/options.py``.

Each ``fastivim run`` option takes its default and help text from the option table
(:data:`fastivim.options.OPTIONS`), so the command line, config files and ``dump-defaults``
cannot disagree. Also here: the error handling every command shares (one ``Error:`` line, exit
status 1) and the command line as typed, for run records.
"""

from __future__ import annotations

import functools
import shlex
import traceback
import warnings
from pathlib import Path

import click

from .._atomic import one_line, parse_number
from ..model import METHODS, MODELS, PARAM_NAMES
from ..options import BY_KEY, ConflictError


class _PathType(click.Path):
    """``click.Path`` that refuses an empty string: ``-o ""`` would mean the current folder."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("empty path (name a file or folder)", param, ctx)
        return super().convert(value, param, ctx)


#: Click type of every path argument and option.
path_type = _PathType(path_type=Path)


def from_table(*decls, key, **kw):
    """A ``click.option`` whose default and help come from :data:`fastivim.options.OPTIONS`."""
    default = BY_KEY[key].default
    kw.setdefault("help", BY_KEY[key].help)
    if default is not None and not isinstance(default, dict):
        kw.setdefault("default", default)
        kw.setdefault("show_default", not isinstance(default, bool))
    return click.option(*decls, key, **kw)


def parse_bounds(ctx, param, values):
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
            out[key] = (parse_number(parts[0].strip()), parse_number(parts[1].strip()))
        except ValueError:
            raise click.BadParameter(f"{item!r}: LO and HI must be numbers") from None
    return out


#: ``--method``: the choices are the methods of :data:`fastivim.model.METHODS`.
method_opt = from_table("--method", key="method", type=click.Choice(list(METHODS)))

#: ``--model``: the signal models of :data:`fastivim.model.MODELS`.
model_opt = from_table("--model", key="model", type=click.Choice(list(MODELS)))

#: ``--uncertainty``: also write the one-SD maps (``D_sd.nii.gz``...).
uncertainty_opt = from_table("--uncertainty", key="uncertainty", is_flag=True)

#: ``--seed N`` of the bayesian method's EM subsample.
seed_opt = from_table("--seed", key="seed", type=click.IntRange(min=0), metavar="N")

#: ``--b-threshold B`` (s/mm²).
b_threshold_opt = from_table("--b-threshold", key="b_threshold", type=click.FloatRange(min=0),
                             metavar="B")

#: ``--bounds KEY=LO,HI`` (repeatable).
bounds_opt = click.option(
    "--bounds", multiple=True, callback=parse_bounds, metavar="KEY=LO,HI",
    help="bound of one parameter (repeatable; keys S0, f, D_star, D; D in mm²/s), "
         "e.g. --bounds f=0,0.5")

#: ``--mask-fraction`` of the automatic mask.
mask_fraction_opt = from_table("--mask-fraction", key="mask_fraction",
                               type=click.FloatRange(0, 1, max_open=True))

#: ``--threads N``.
threads_opt = from_table("--threads", key="threads", type=click.IntRange(min=1), metavar="N")

#: ``-q/--quiet``: no progress bar or notes on stderr.
quiet_opt = from_table("-q", "--quiet", key="quiet", is_flag=True)

#: ``-v/--verbose`` (count).
verbose_opt = from_table("-v", "--verbose", key="verbose", count=True, show_default=False)


def command_line() -> str:
    """The command as typed (``fastivim run ...``), for the run record."""
    ctx = click.get_current_context(silent=True)
    argv = ctx.meta.get("fastivim.argv") if ctx is not None else None
    if argv is None:
        import sys

        return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return shlex.join(["fastivim", *argv])


def note_printer(quiet: bool):
    """A ``note`` callable for the library: ``fastivim: MESSAGE`` on stderr, or None if quiet."""
    if quiet:
        return None
    return lambda msg: click.echo(f"fastivim: {msg}", err=True)


def clean_errors(fn):
    """Turn library errors into one-line ``Error: ...`` messages with exit status 1 (2 for
    options that conflict)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # library warnings (numpy, nibabel) never reach stderr raw: after a refusal the Error
        # line says all; after a run they become notes (not under -q)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            result = _call(*args, **kwargs)
        if not kwargs.get("quiet"):
            for msg in dict.fromkeys(one_line(w.message) for w in caught):
                click.echo(f"fastivim: warning: {msg}", err=True)
        return result

    def _call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except ConflictError as exc:
            raise click.UsageError(one_line(exc)) from None
        except (ValueError, RuntimeError, OSError) as exc:
            # io.InputError/OutputError, options.OptionError, fit's ValueErrors
            if kwargs.get("verbose", 0) >= 2:
                traceback.print_exc()
            raise click.ClickException(one_line(exc)) from None
        except Exception as exc:  # a bug: still one line unless asked for the traceback
            if kwargs.get("verbose", 0) >= 2:
                raise
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {one_line(exc)} (-vv shows the traceback)"
            ) from None

    return wrapper


#: Default phantom shape of ``fastivim simulate`` and ``fastivim demo`` (X, Y, Z): ~41k voxels,
#: a second or two to fit.
DEMO_SHAPE = (64, 64, 10)


def _int_tuple(ctx, param, value):
    try:
        shape = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected X,Y,Z integers, got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise click.BadParameter(f"expected three positive integers X,Y,Z, got {value!r}")
    return shape


def shape_opt(help: str):
    """``--shape X,Y,Z`` of a phantom (default :data:`DEMO_SHAPE`)."""
    return click.option("--shape", default=",".join(map(str, DEMO_SHAPE)), callback=_int_tuple,
                        show_default=True, help=help)
