"""Options of ``fastivim run``: one table for the defaults, ``dump-defaults`` and ``--config``.

A config file is YAML with some of the keys of :data:`OPTIONS`; ``fastivim dump-defaults`` writes
all of them with their defaults and a comment each. Values from the command line win over the
file, which wins over the defaults. An unknown key or a value of the wrong type is an error that
names the file and the key; nothing is ignored silently.

Paths in a config file are taken relative to the directory the command runs in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .model import DEFAULT_BOUNDS, PARAM_NAMES, resolve_bounds


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Option:
    """One option of ``fastivim run``: its config key, default, value kind and help text."""

    key: str
    default: object
    kind: str  # path | bool | float | threads | method | bounds | label | count
    help: str


#: Every option of ``fastivim run`` that a config file may set, in ``dump-defaults`` order.
OPTIONS = (
    Option("bvals", None, "path",
           "b-value file, s/mm² (FSL/BIDS one row, or one value per line); "
           "if not set: <image stem>.bval beside the image"),
    Option("bvecs", None, "path", "gradient directions (3 rows or 3 columns); recorded, not used"),
    Option("mask", None, "path", "3D NIfTI on the image's grid, any non-zero voxel is fitted; "
                                 "if not set: automatic mask from the lowest-b image"),
    Option("no_mask", False, "bool", "fit every voxel (no mask at all)"),
    Option("mask_fraction", 0.1, "fraction",
           "automatic mask: keep voxels whose lowest-b signal exceeds this fraction of the "
           "image's 99th-percentile lowest-b signal"),
    Option("method", "segmented", "method",
           "segmented: D from the high-b samples first; full: all four parameters together"),
    Option("b_threshold", 200.0, "float", "s/mm²: samples at or above it give D (segmented)"),
    Option("bounds", {k: list(v) for k, v in DEFAULT_BOUNDS.items()}, "bounds",
           "[lower, upper] per parameter (S0 signal units, f fraction, D_star and D mm²/s); "
           "upper null: no bound"),
    Option("threads", None, "threads", "numba threads; if not set: all cores"),
    Option("out_dir", None, "path", "output directory; if not set: <image stem>_ivim/ in the "
                                    "current directory (unless bids is set)"),
    Option("overwrite", False, "bool", "replace maps that already exist"),
    Option("bids", None, "path", "BIDS derivatives directory to write into (needs subject)"),
    Option("subject", None, "label", "BIDS subject label, without 'sub-'"),
    Option("session", None, "label", "BIDS session label, without 'ses-'"),
    Option("report", False, "bool", "write the quality-control report after the fit "
                                    "(needs fastivim[report])"),
    Option("quiet", False, "bool", "no progress bar or notes on stderr"),
    Option("verbose", 0, "count", "more notes on stderr (0, 1 or 2)"),
)

#: Option by key.
BY_KEY = {o.key: o for o in OPTIONS}


def defaults() -> dict:
    """Every option's default value (a fresh copy)."""
    return {o.key: _copy(o.default) for o in OPTIONS}


def _copy(value):
    if isinstance(value, dict):
        return {k: list(v) for k, v in value.items()}
    return value


def _yaml_scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


def dump_defaults() -> str:
    """YAML text with every option, its default and a comment (``fastivim dump-defaults``)."""
    lines = ["# fastivim run options. Use: fastivim run --config THIS_FILE dwi.nii.gz",
             "# Command-line options win over this file; unknown keys are errors.", ""]
    for o in OPTIONS:
        lines.append(f"# {o.help}")
        if o.kind == "bounds":
            lines.append(f"{o.key}:")
            for k in PARAM_NAMES:
                lo, hi = o.default[k]
                lines.append(f"  {k}: [{_yaml_scalar(lo)}, {_yaml_scalar(hi)}]")
        else:
            lines.append(f"{o.key}: {_yaml_scalar(o.default)}")
    return "\n".join(lines) + "\n"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_value(key: str, value, where: str = "config"):
    """Validate one option value and return it normalised.

    Raises
    ------
    ConfigError
        Unknown key or wrong type; the message starts with ``where`` and names the key.
    """
    if key not in BY_KEY:
        raise ConfigError(f"{where}: unknown key {key!r} (valid keys: {', '.join(BY_KEY)})")
    kind = BY_KEY[key].kind

    def bad(expected):
        return ConfigError(f"{where}: {key!r} must be {expected}, got {value!r}")

    if kind == "path":
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise bad("a path or null")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "float":
        if not _is_number(value) or not math.isfinite(value):
            raise bad("a finite number")
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
        if not isinstance(value, str) or not value.isalnum():
            raise bad("a letters-and-digits label or null")
        return value
    if kind == "method":
        if value not in ("segmented", "full"):
            raise bad("'segmented' or 'full'")
        return value
    if kind == "bounds":
        return check_bounds(value, where)
    raise AssertionError(kind)  # pragma: no cover


def check_bounds(value, where: str = "config") -> dict:
    """Validate a ``{name: [lower, upper]}`` mapping (upper may be null for no bound)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'bounds' must be a mapping of parameter: [lower, upper], "
                          f"got {value!r}")
    out = {}
    for k, pair in value.items():
        name = f"bounds.{k}"
        if k not in PARAM_NAMES:
            raise ConfigError(f"{where}: unknown key {name!r} (valid: {', '.join(PARAM_NAMES)})")
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not _is_number(pair[0])
                or not (pair[1] is None or _is_number(pair[1]))):
            raise ConfigError(f"{where}: {name!r} must be [lower, upper] numbers, got {pair!r}")
        out[k] = (float(pair[0]), math.inf if pair[1] is None else float(pair[1]))
    try:
        resolve_bounds(out)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return out


def load_config(path) -> dict:
    """Read and validate a YAML config file.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    dict
        Only the keys the file sets, validated (bounds as ``{name: (lower, upper)}``).

    Raises
    ------
    ConfigError
        Unreadable file, invalid YAML, not a mapping, unknown key or wrong type; one line that
        names the file (and the key).
    """
    import yaml  # lazy: only runs that pass --config need it

    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({getattr(exc, 'strerror', None) or exc})"
                          ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return {str(k): check_value(str(k), v, str(path)) for k, v in data.items()}
