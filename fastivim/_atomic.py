"""Small standard-library helpers shared by io, pipeline, cli, report and batch.

Atomic file writes (a file appears complete or not at all), the one JSON encoding of every file
fastivim writes, and one-line error messages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path, payload: bytes) -> None:
    """Write ``payload`` to a hidden ``.NAME.partial`` beside ``path``, then rename it over.

    An interrupted write leaves no file that looks finished, and no partial file either.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def json_bytes(obj) -> bytes:
    """The JSON text of every file fastivim writes: indented, UTF-8, no NaN/inf (an error)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_json_atomic(path, obj) -> None:
    """:func:`write_atomic` of :func:`json_bytes`."""
    write_atomic(path, json_bytes(obj))


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type name when the message is empty)."""
    return " ".join((str(exc).strip() or type(exc).__name__).split())
