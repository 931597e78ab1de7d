"""Config files of ``fastivim run``: ``dump-defaults`` writes one, ``--config`` reads one.

A config file is YAML with some of the keys of :data:`fastivim.options.OPTIONS`;
``fastivim dump-defaults`` writes all of them with their defaults and a comment each. Values from
the command line win over the file, which wins over the defaults. An unknown key or a value of
the wrong type is an error that names the file and the key; nothing is ignored silently.

Relative paths in a config file (``bvals``, ``bvecs``, ``mask``, ``out_dir``, ``bids``) are taken
relative to the folder of the config file, so a file works from wherever the command runs.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

from .model import PARAM_NAMES
from .options import (
    BY_KEY,
    DEFAULTS,
    OPTIONS,
    FitOptions,
    OptionError,
    check_bounds,
    check_threads,
    resolve_path,
)
from .options import check_value as _check_value

__all__ = ["BY_KEY", "OPTIONS", "ConfigError", "check_bounds", "check_value", "defaults",
           "dump_defaults", "load_config"]


class ConfigError(OptionError):
    """A config file that cannot be used; the message names the file and the key."""


def defaults() -> dict:
    """Every option's default value (a fresh copy; bounds as ``{name: [lower, upper]}``)."""
    return {k: ({n: list(v) for n, v in d.items()} if isinstance(d, dict) else d)
            for k, d in DEFAULTS.items()}


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
             "# Command-line options win over this file; unknown keys are errors.",
             "# Relative paths (bvals, bvecs, mask, out_dir, bids) are taken relative to the",
             "# folder of this file, not to where the command runs.", ""]
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


def check_value(key: str, value, where: str = "config"):
    """Validate one config value (YAML types) and return it normalised; see
    :func:`fastivim.options.check_value`.

    Raises
    ------
    ConfigError
        Unknown key or wrong type; the message starts with ``where`` and names the key.
    """
    try:
        return _check_value(key, value, where, strict=True)
    except OptionError as exc:
        raise ConfigError(str(exc)) from None


#: YAML 1.1 (PyYAML) reads a number in exponent form without a dot, ``1e-4``, as a string;
#: config files are full of such diffusivities, so they are read as floats as YAML 1.2 does.
_FLOAT_RE = (r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
             r"|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
             r"|[0-9][0-9_]*[eE][-+]?[0-9]+)$"
             r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")


#: Config keys that belong to :class:`fastivim.options.FitOptions`.
_FIT_KEYS = {f.name for f in fields(FitOptions)}


def _loader():
    """A safe YAML loader that reads ``1e-4`` as a float (see :data:`_FLOAT_RE`)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT_RE),
                                 list("-+0123456789."))
    return Loader


def load_config(path) -> dict:
    """Read and validate a YAML config file.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    dict
        Only the keys the file sets, validated (bounds as ``{name: (lower, upper)}``; relative
        paths joined to the config file's folder).

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
        data = yaml.load(text, Loader=_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    values = {str(k): check_value(str(k), v, str(path)) for k, v in data.items()}
    fit_keys = {k: v for k, v in values.items() if k in _FIT_KEYS}
    try:  # options that exclude each other within the file (bayesian + simplified)
        FitOptions(**fit_keys)
    except OptionError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if values.get("threads") is not None:
        try:
            check_threads(values["threads"])
        except OptionError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    base = Path(path).absolute().parent
    for key, value in values.items():
        if BY_KEY[key].kind in ("path", "bvals"):
            values[key] = resolve_path(value, base)
    return values
