"""Small standard-library helpers shared by io, pipeline, cli, report and batch.

Atomic file writes (a file appears complete or not at all), the one JSON encoding of every file
fastivim writes, and one-line error messages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def partial_path(path) -> Path:
    """Where a file is staged before it is renamed into place: hidden ``.NAME.partial`` beside
    it (same folder, so the rename is atomic). Every writer of fastivim uses this name."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def write_atomic(path, payload: bytes) -> None:
    """Write ``payload`` to :func:`partial_path` of ``path``, then rename it over ``path``.

    An interrupted write leaves no file that looks finished, and no partial file either. For
    several files that must appear together, see :class:`fastivim.io.write.Staging`.
    """
    path = Path(path)
    tmp = partial_path(path)
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
