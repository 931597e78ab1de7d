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

from ._atomic import read_small_text, short_repr
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


#: Plain scalars that are numbers, YAML 1.2 core schema style: decimal integers and decimal or
#: scientific floats (``1e-4`` too, which PyYAML's YAML 1.1 reads as a string). Not YAML 1.1's
#: base-60 ``1:30`` (read as 90), ``800_0`` (read as 8000), octal ``017`` or hex: those stay
#: strings, which the option's type check then refuses with a message.
_INT_RE = r"^[-+]?[0-9]+$"
_FLOAT_RE = (r"^[-+]?(?:[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?"
             r"|\.[0-9]+(?:[eE][-+]?[0-9]+)?"
             r"|[0-9]+[eE][-+]?[0-9]+)$"
             r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")

#: Booleans: YAML 1.2's ``true``/``false`` only (YAML 1.1 also reads ``yes``, ``no``, ``on``,
#: ``off``, ``y``, ``n``, so that a session label ``no`` would silently become False).
_BOOL_RE = r"^(?:true|True|TRUE|false|False|FALSE)$"


#: Config keys that belong to :class:`fastivim.options.FitOptions`.
_FIT_KEYS = {f.name for f in fields(FitOptions)}


def _loader():
    """A strict, safe YAML loader: YAML 1.2 core numbers and booleans (see :data:`_FLOAT_RE`),
    no anchors or aliases at all (an alias bomb cannot expand), and a key given twice in one
    mapping is an error (the last value would otherwise win silently)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.composer.ComposerError(
                    None, None, "anchors (&name) and aliases (*name) are not allowed in a config "
                    "file", event.start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class says so
                    break
                if dup:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {short_repr(key, 40)} is given twice",
                        key_node.start_mark)
            return super().construct_mapping(node, deep)

    resolvers = {}
    for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items():
        kept = [(tag, rx) for tag, rx in rules if tag not in (
            "tag:yaml.org,2002:float", "tag:yaml.org,2002:int", "tag:yaml.org,2002:bool")]
        if kept:
            resolvers[first] = kept
    Loader.yaml_implicit_resolvers = resolvers
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(_BOOL_RE), list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(_INT_RE),
                                 list("-+0123456789"))
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
        Unreadable file (not a regular file, or larger than
        :data:`fastivim._atomic.SMALL_FILE_LIMIT`), invalid YAML (anchors and aliases, a key
        given twice), not a mapping, unknown key or wrong type; one line that names the file
        (and the key), never a value longer than a few dozen characters.
    """
    import yaml  # lazy: only runs that pass --config need it

    text = read_small_text(path, "config file", ConfigError)
    try:
        data = yaml.load(text, Loader=_loader())
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    for k in data:
        if not isinstance(k, str):
            raise ConfigError(f"{path}: key {short_repr(k, 40)} is not an option name")
    values = {k: check_value(k, v, str(path)) for k, v in data.items()}
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
