"""The run record (``fastivim.json``) read back: read bounded, and validated before any use.

A record is JSON written by fastivim, but it sits in a folder other people and programs can
write to, so ``report`` and ``batch`` treat it as input: :func:`read_record` reads it with the
bounded reader (:func:`fastivim._atomic.read_small_text`) and :func:`check_record` checks the
type of every field fastivim uses (:data:`SCHEMA`) before any of them is touched. A record that
fails is refused with one line naming the file and the field; ``fastivim batch`` marks that
series failed and goes on with the others.

The ``manifest`` is required: it is what makes a record the seal of a complete run (see
:class:`fastivim.io.write.LayoutWriter`). Each entry must name a file of the record's own
layout (a plain name, no folder, no ``..``) with its size and SHA-256.
"""

from __future__ import annotations

import json
import math
import re

from .._atomic import one_line, read_small_text, short_repr
from .checks import InputError

_NUM = (int, float)


def _number(v) -> bool:
    return isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _str(v) -> bool:
    return isinstance(v, str)


def _opt(check):
    def ok(v):
        return v is None or check(v)
    ok.__doc__ = f"null or {check.__doc__}"
    return ok


def _numbers(v) -> bool:
    return isinstance(v, list) and all(_number(x) for x in v)


def _bounds(v) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(p, list) and len(p) == 2 and _number(p[0])
        and (p[1] is None or _number(p[1])) for k, p in v.items())


def _stats(v) -> bool:
    return isinstance(v, dict) and all(
        isinstance(s, dict) and all(_opt(_number)(s.get(k)) for k in ("median", "q25", "q75"))
        for s in v.values())


def _voxels(v) -> bool:
    return isinstance(v, dict) and all(_int(v.get(k)) for k in ("total", "fitted", "quality"))


def _timings(v) -> bool:
    return isinstance(v, dict) and all(_number(x) for x in v.values())


def _bvecs(v) -> bool:
    return isinstance(v, list) and all(isinstance(r, list) and len(r) == 3
                                       and all(_number(x) for x in r) for r in v)


_number.__doc__ = "a finite number"
_int.__doc__ = "a non-negative integer"
_str.__doc__ = "a string"
_numbers.__doc__ = "a list of finite numbers"
_bounds.__doc__ = "a mapping of parameter: [lower, upper]"
_stats.__doc__ = "a mapping of map: {median, q25, q75} numbers or null"
_voxels.__doc__ = "a mapping with integer total, fitted and quality"
_timings.__doc__ = "a mapping of step: seconds"
_bvecs.__doc__ = "a list of [x, y, z] numbers"


def _is_dict(v) -> bool:
    """a mapping"""
    return isinstance(v, dict)


def _is_bool(v) -> bool:
    """true or false"""
    return isinstance(v, bool)


#: Every field of a run record fastivim reads, with its check (optional unless in
#: :data:`REQUIRED`). Fields fastivim does not read are not checked.
SCHEMA = {
    "manifest": _is_dict,
    "version": _str,
    "method": _str,
    "model": _str,
    "bounds": _bounds,
    "b_values": _numbers,
    "b_threshold": _number,
    "uncertainty": _is_bool,
    "prior": _opt(_str),
    "noise_sigma": _opt(_number),
    "input": _opt(_str),
    "input_shape": _opt(lambda v: isinstance(v, list) and all(_int(x) for x in v)),
    "command": _opt(_str),
    "mask_source": _opt(_str),
    "threads": _opt(_int),
    "bvecs": _opt(_bvecs),
    "settings": _is_dict,
    "inputs": _is_dict,
    "stats": _stats,
    "voxels": _voxels,
    "timings": _timings,
}

#: Fields every record must hold.
REQUIRED = ("manifest",)

#: Fields a record must hold to stand for a finished series in ``fastivim batch``.
BATCH_FIELDS = ("stats", "voxels", "timings")

_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_record(record, path, need=()) -> dict:
    """Validate a run record against :data:`SCHEMA`; return it.

    Parameters
    ----------
    record : object
        The parsed JSON.
    path : Path
        The record's file, for messages.
    need : sequence of str
        Fields required besides :data:`REQUIRED`.

    Raises
    ------
    InputError
        One line naming the file and the first bad field (values shortened).
    """
    if not isinstance(record, dict):
        raise InputError(f"{path}: not a fastivim run record (a JSON {type(record).__name__}, "
                         f"expected an object)")
    for key in (*REQUIRED, *need):
        if key not in record:
            raise InputError(f"{path}: malformed run record: no {key!r} (not a complete run; "
                             f"run it again)")
    for key, check in SCHEMA.items():
        if key in record and not check(record[key]):
            raise InputError(f"{path}: malformed run record: {key!r} must be {check.__doc__}, "
                             f"got {short_repr(record[key], 60)}")
    for name, entry in record["manifest"].items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name \
                or name.startswith(".") or "\x00" in name:
            raise InputError(f"{path}: malformed run record: manifest entry "
                             f"{short_repr(name, 60)} is not a file name of this folder")
        if not (isinstance(entry, dict) and _int(entry.get("bytes"))
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            raise InputError(f"{path}: malformed run record: manifest entry {name!r} must be "
                             f"{{\"bytes\": size, \"sha256\": hex digest}}, got "
                             f"{short_repr(entry, 60)}")
    return record


def read_record(path, need=()) -> dict:
    """Read (bounded, regular files only) and validate (:func:`check_record`) a run record.

    Raises
    ------
    InputError
        Unreadable, not JSON, or malformed; one line naming the file.
    """
    text = read_small_text(path, "run record", InputError)
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{path}: cannot read the run record ({one_line(exc)})") from None
    return check_record(record, path, need)
