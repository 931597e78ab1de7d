"""Every option of a fit and of ``fastivim run``: frozen, validated objects, defaults written once.

Two objects, built once at the edge (a Python call, the command line, a config file or a batch)
and passed down:

* :class:`FitOptions`: what the kernel is told (method, bounds, b_threshold).
  :func:`fastivim.fit_ivim` builds one from its arguments.
* :class:`RunOptions`: one ``fastivim run``: inputs, mask, threads, outputs and the fit options.

Each field carries its default, its kind and its help text; the Click options, ``fastivim
dump-defaults`` and the config-file reader (:mod:`fastivim.config`) all read them from
:data:`OPTIONS`. Invalid values raise :class:`OptionError` with a one-line message that names the
option (and the file it came from, when it came from one).

This module imports only the standard library and :mod:`fastivim.model`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ._atomic import short_repr
from .model import DEFAULT_BOUNDS, METHODS, MODELS, PARAM_NAMES, bounds_from_json, resolve_bounds


class OptionError(ValueError):
    """An option value that cannot be used; the message names the option."""


class ConflictError(OptionError):
    """Options that exclude or need each other (a usage error on the command line)."""


def _opt(default, kind: str, help: str, **kw):
    """A dataclass field with its kind and help text as metadata (the option table)."""
    return field(default=default, metadata={"kind": kind, "help": help}, **kw)


class Bounds(dict):
    """Read-only, hashable ``{name: (lower, upper)}`` (a dict, so it pickles and prints as one)."""

    def _read_only(self, *args, **kwargs):
        raise TypeError("bounds of an options object are read-only; build a new one")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _read_only

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def __reduce__(self):
        return (Bounds, (dict(self),))


def _frozen_bounds(bounds) -> Bounds:
    """Bounds merged over the defaults and validated (see :func:`fastivim.resolve_bounds`)."""
    return Bounds(resolve_bounds(bounds))


@dataclass(frozen=True)
class FitOptions:
    """What the fit is told, validated on construction.

    Attributes
    ----------
    method : str
        A key of :data:`fastivim.model.METHODS`.
    b_threshold : float
        s/mm²: samples at or above it give D in the segmented method (and its start), >= 0.
    bounds : mapping
        ``{name: (lower, upper)}`` for every parameter (missing keys take
        :data:`fastivim.DEFAULT_BOUNDS`; see :func:`fastivim.resolve_bounds`).
    model : str
        A name of :data:`fastivim.model.MODELS`; ``simplified`` does not go with ``bayesian``.
    uncertainty : bool
        Also compute the one-SD maps ``D_sd``, ``D_star_sd``, ``f_sd``, ``S0_sd`` (``bayesian``
        always does).
    seed : int
        Seed of the ``bayesian`` method's EM subsample (>= 0).
    """

    method: str = _opt("segmented", "method",
                       "; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    b_threshold: float = _opt(200.0, "float",
                              "s/mm²: samples at or above it give D (segmented)")
    bounds: object = _opt(Bounds(DEFAULT_BOUNDS), "bounds",
                          "[lower, upper] per parameter (S0 signal units, f fraction, D_star and "
                          "D mm²/s); upper null: no bound")
    model: str = _opt("ivim", "model", "ivim: the bi-exponential model; simplified: S0, f and D "
                                       "only (S(0) = S0, S(b) = S0 (1 - f) exp(-b D) for b >= "
                                       "b_threshold), for protocols with too few b-values for "
                                       "D_star")
    uncertainty: bool = _opt(False, "bool", "also write the one-SD uncertainty maps D_sd, "
                                            "D_star_sd, f_sd, S0_sd (bayesian always does)")
    seed: int = _opt(0, "count", "seed of the bayesian method's EM subsample (same seed, same "
                                 "maps)")

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise OptionError(f"unknown method {short_repr(self.method, 60)}; valid methods are "
                              f"{', '.join(METHODS)}")
        try:
            b_threshold = float(self.b_threshold)
        except (TypeError, ValueError):
            raise OptionError(f"b_threshold must be a finite number >= 0, got "
                              f"{short_repr(self.b_threshold, 60)}") from None
        if not math.isfinite(b_threshold) or b_threshold < 0:
            raise OptionError(f"b_threshold must be a finite number >= 0, got {b_threshold}")
        object.__setattr__(self, "b_threshold", b_threshold)
        for key in ("model", "uncertainty", "seed"):
            object.__setattr__(self, key, check_value(key, getattr(self, key)))
        if self.model == "simplified" and self.method == "bayesian":
            raise ConflictError("the bayesian method fits the ivim model only; use method "
                                "segmented or full with model simplified")
        try:
            object.__setattr__(self, "bounds", _frozen_bounds(self.bounds))
        except ValueError as exc:
            raise OptionError(str(exc)) from None

    def as_json(self) -> dict:
        """JSON form (an infinite bound is null), as recorded in ``fastivim.json``."""
        from .model import bounds_to_json

        return {"method": self.method, "b_threshold": self.b_threshold,
                "bounds": bounds_to_json(self.bounds), "model": self.model,
                "uncertainty": self.uncertainty, "seed": self.seed}


@dataclass(frozen=True)
class RunOptions:
    """One ``fastivim run``: what to read, how to mask, where to write; and the fit options.

    Build it with :meth:`build` from flat keys (as in a config file); paths may be ``str`` or
    :class:`~pathlib.Path`. Labels are given without or with their ``sub-``/``ses-`` prefix.
    """

    bvals: object = _opt(None, "bvals", "b-value file, s/mm² (FSL/BIDS one row, or one value per "
                                       "line); if not set: <image stem>.bval beside the image")
    bvecs: object = _opt(None, "path",
                         "gradient directions (3 rows or 3 columns); recorded, not used")
    mask: object = _opt(None, "path", "3D NIfTI on the image's grid, any non-zero voxel is "
                                      "fitted; if not set: automatic mask from the lowest-b image")
    no_mask: bool = _opt(False, "bool", "fit every voxel (no mask at all)")
    mask_fraction: float = _opt(0.1, "fraction",
                                "automatic mask: keep voxels whose lowest-b signal exceeds this "
                                "fraction of the image's 99th-percentile lowest-b signal")
    fit: FitOptions = field(default_factory=FitOptions, metadata={"kind": "fit"})
    threads: object = _opt(None, "threads", "numba threads; if not set: all cores")
    out_dir: object = _opt(None, "path", "output directory; if not set: <image stem>_ivim/ in "
                                         "the current directory (unless bids is set)")
    overwrite: bool = _opt(False, "bool", "replace the outputs of an earlier run")
    bids: object = _opt(None, "path", "BIDS derivatives directory to write into (needs subject)")
    subject: object = _opt(None, "label", "BIDS subject label ('01' or 'sub-01')")
    session: object = _opt(None, "label", "BIDS session label ('01' or 'ses-01')")
    report: bool = _opt(False, "bool", "write the quality-control report after the fit "
                                       "(needs fastivim[report])")
    quiet: bool = _opt(False, "bool", "no progress bar or notes on stderr")
    verbose: int = _opt(0, "count", "more notes on stderr (0, 1 or 2)")

    def __post_init__(self):
        for f in fields(self):
            kind = f.metadata.get("kind")
            if kind != "fit":
                object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name)))
        if not isinstance(self.fit, FitOptions):
            raise OptionError(f"fit must be FitOptions, got {type(self.fit).__name__}")
        if self.mask is not None and self.no_mask:
            raise ConflictError("--mask and --no-mask exclude each other")
        if self.bids is not None and self.subject is None:
            raise ConflictError("--bids needs --subject")
        if self.bids is None and (self.subject is not None or self.session is not None):
            raise ConflictError("--subject/--session need --bids")

    @classmethod
    def build(cls, values: dict | None = None, **kw) -> RunOptions:
        """A RunOptions from flat keys (those of :data:`OPTIONS`); unknown keys are errors."""
        values = {**(values or {}), **kw}
        unknown = set(values) - set(BY_KEY)
        if unknown:
            raise OptionError(f"unknown option {sorted(unknown)[0]!r} (valid: "
                              f"{', '.join(BY_KEY)})")
        fit_keys = {f.name for f in fields(FitOptions)}
        fit = FitOptions(**{k: v for k, v in values.items() if k in fit_keys})
        return cls(fit=fit, **{k: v for k, v in values.items() if k not in fit_keys})

    def replace(self, **kw) -> RunOptions:
        """A copy with some flat keys changed (validated again)."""
        fit_keys = {f.name for f in fields(FitOptions)}
        fit_kw = {k: kw.pop(k) for k in list(kw) if k in fit_keys}
        fit = replace(self.fit, **fit_kw) if fit_kw else self.fit
        return replace(self, fit=fit, **kw)

    @property
    def mask_mode(self):
        """``None`` (no mask), ``"auto"`` or the mask's path."""
        if self.no_mask:
            return None
        return "auto" if self.mask is None else self.mask


@dataclass(frozen=True)
class Option:
    """One row of the option table: config key, default, kind and help text."""

    key: str
    default: object
    kind: str  # path | bvals | bool | float | fraction | threads | method | model | bounds | label
    # | count
    help: str


def _table() -> tuple:
    rows = []
    for f in fields(RunOptions):
        if f.metadata["kind"] == "fit":
            rows += [Option(g.name, g.default, g.metadata["kind"], g.metadata["help"])
                     for g in fields(FitOptions)]
        else:
            rows.append(Option(f.name, f.default, f.metadata["kind"], f.metadata["help"]))
    return tuple(rows)


#: Every option of ``fastivim run`` (and of a config file), in ``dump-defaults`` order.
OPTIONS = _table()

#: Option by key.
BY_KEY = {o.key: o for o in OPTIONS}

#: The default of each option (bounds as a plain ``{name: (lower, upper)}`` dict).
DEFAULTS = {o.key: dict(o.default) if o.kind == "bounds" else o.default for o in OPTIONS}


# ------------------------------------------------------------------------------ validation

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_bids_label(label: str) -> bool:
    """A BIDS label: one or more ASCII letters and digits (``str.isalnum`` would also take
    ``é`` or Arabic-Indic digits, which BIDS tools refuse)."""
    return isinstance(label, str) and label.isascii() and label.isalnum()


def _label(key: str, value):
    """A BIDS label without its prefix: ``sub-01`` and ``01`` both give ``01``."""
    prefix = {"subject": "sub-", "session": "ses-"}[key]
    if isinstance(value, str) and value.startswith(prefix):
        value = value[len(prefix):]
    return value


def check_value(key: str, value, where: str | None = None, strict: bool = False):
    """Validate one option value and return it normalised.

    Parameters
    ----------
    key : str
        A key of :data:`OPTIONS`.
    value
    where : str, optional
        Prefix of the message (a config file's path).
    strict : bool
        Types as YAML gives them (a path must be a string), for config files.

    Raises
    ------
    OptionError
        Unknown key or a value of the wrong kind; the message names the key.
    """
    pre = f"{where}: " if where else ""
    if not isinstance(key, str) or key not in BY_KEY:
        raise OptionError(f"{pre}unknown key {short_repr(key, 40)} (valid keys: "
                          f"{', '.join(BY_KEY)})")
    kind = BY_KEY[key].kind

    def bad(expected):  # the value shortened: a config file can hold a huge one
        return OptionError(f"{pre}{key!r} must be {expected}, got {short_repr(value, 60)}")

    if kind == "bvals" and not strict and value is not None \
            and not isinstance(value, (str, os.PathLike)):
        try:  # the API also takes the b-values themselves (s/mm²)
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise bad("a path, a sequence of numbers or null") from None
    if kind in ("path", "bvals"):
        if value is None:
            return None
        ok = isinstance(value, str) if strict else isinstance(value, (str, os.PathLike))
        if not ok or not str(value):
            raise bad("a path or null")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "float":
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise bad("a finite number >= 0")
        return float(value)
    if kind == "fraction":
        if not _is_number(value) or not 0 <= value < 1:
            raise bad("a number in [0, 1)")
        return float(value)
    if kind == "threads":
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad("a positive integer or null")
        return value
    if kind == "count":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad("a non-negative integer")
        return value
    if kind == "label":
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            raise bad("a quoted label such as '01' (a bare number loses its leading zeros)")
        value = _label(key, value)
        if not isinstance(value, str) or not is_bids_label(value):
            raise bad("a letters-and-digits label, ASCII only (optionally with its 'sub-'/'ses-' "
                      "prefix) or null")
        return value
    if kind == "method":
        if not isinstance(value, str) or value not in METHODS:
            raise bad(" or ".join(repr(m) for m in METHODS))
        return value
    if kind == "model":
        if not isinstance(value, str) or value not in MODELS:
            raise bad(" or ".join(repr(m) for m in MODELS))
        return value
    if kind == "bounds":
        return check_bounds(value, where)
    raise AssertionError(kind)  # pragma: no cover


def check_bounds(value, where: str | None = None) -> dict:
    """Validate a ``{name: [lower, upper]}`` mapping (upper may be null for no bound).

    Returns only the keys given, as ``{name: (lower, upper)}`` floats.
    """
    pre = f"{where}: " if where else ""
    if not isinstance(value, dict):
        raise OptionError(f"{pre}'bounds' must be a mapping of parameter: [lower, upper], "
                          f"got {short_repr(value, 60)}")
    out = {}
    for k, pair in value.items():
        name = f"bounds.{k}"
        if not isinstance(k, str) or k not in PARAM_NAMES:
            raise OptionError(f"{pre}unknown key {short_repr(name, 40)} (valid: "
                              f"{', '.join(PARAM_NAMES)})")
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not _is_number(pair[0])
                or not (pair[1] is None or _is_number(pair[1]))):
            raise OptionError(f"{pre}{name!r} must be [lower, upper] numbers, got "
                              f"{short_repr(pair, 60)}")
        out.update(bounds_from_json({k: pair}))
    try:
        resolve_bounds(out)
    except ValueError as exc:
        raise OptionError(f"{pre}{exc}") from None
    return out


def check_threads(threads) -> int | None:
    """``threads`` if it is None or within 1..cores of this machine, else :class:`OptionError`.

    The limit is numba's ``NUMBA_NUM_THREADS`` (``$NUMBA_NUM_THREADS`` or the CPU count).
    """
    if threads is None:
        return None
    import numba

    most = numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= most:
        raise OptionError(f"threads must be between 1 and {most} on this machine, got {threads}")
    return threads


def resolve_path(value, base: Path):
    """A path option taken relative to ``base`` (a config file's folder) unless absolute."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p
