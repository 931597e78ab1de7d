"""Small standard-library helpers shared by io, pipeline, cli, config, report and batch.

One safe way to write files into a folder that other people may write to as well (a shared
output or derivatives folder), one bounded reader of small inputs, one strict number parser, the
one JSON encoding of every file fastivim writes, and one-line error messages.

Writing (:func:`write_new`, :func:`write_atomic`, :func:`commit_file`)
    A file is created under its staging name with ``O_CREAT | O_EXCL | O_NOFOLLOW``: the call
    never opens an existing file, so a symbolic link planted at a staging name (even while a run
    fits) is never followed. A staged file is renamed onto its final name only after
    :func:`check_owned` found no link and no special file there. A name fastivim owns in an
    output folder (a map, a sidecar, a record, a report, a lock or staging file) that is a
    symbolic link, a folder or a special file is refused with one line naming it; nothing is
    written outside the output folder.

Reading (:func:`open_regular`, :func:`read_small_text`)
    Inputs are opened with ``O_NONBLOCK`` and checked with ``fstat`` before a byte is read: a
    FIFO, a device (``/dev/zero``) or a folder is refused at once instead of blocking or growing
    memory without bound, and small text inputs (b-values, b-vectors, config files, run records)
    larger than :data:`SMALL_FILE_LIMIT` are refused before they are read.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path

#: Largest small text input read (b-value and b-vector files, config files, run records): 4 MiB.
#: A ``.bval`` of 4 MiB holds some 400,000 values; a real one holds a few hundred bytes.
SMALL_FILE_LIMIT = 4 * 1024 * 1024


class OutputError(RuntimeError):
    """Outputs that cannot or must not be written; the one-line message names the path."""


# ------------------------------------------------------------------------------- writing

def partial_path(path) -> Path:
    """Where a file is staged before it is renamed into place: hidden ``.NAME.partial`` beside
    it (same folder, so the rename is atomic). Every writer of fastivim uses this name."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_owned(path) -> None:
    """Refuse a name fastivim writes that is a symbolic link, a folder or a special file.

    A missing name and a regular file pass. Called for every final and staging name before it
    is created, replaced or renamed onto.

    Raises
    ------
    OutputError
        One line naming the path and what it is.
    """
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # a missing folder is reported elsewhere
        return
    except OSError as exc:
        raise OutputError(f"{path}: cannot check ({exc.strerror or exc})") from None
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{path}: is a symbolic link; fastivim never writes through a link in "
                          f"its output folder (remove it)")
    raise OutputError(f"{path}: is {_kind(st.st_mode)}, where fastivim writes a file (remove it)")


def check_real_dirs(folder, root) -> None:
    """Refuse when a folder between ``root`` (excluded) and ``folder`` (included) is a symbolic
    link or not a folder: a BIDS ``sub-XX/ses-YY/dwi`` planted as a link would send the outputs
    outside the derivatives folder. Missing folders pass (they are created as real ones)."""
    folder, root = Path(folder), Path(root)
    if folder == root or root not in folder.parents:
        return
    parts = folder.relative_to(root).parts
    p = root
    for part in parts:
        p = p / part
        try:
            st = os.lstat(p)
        except (FileNotFoundError, NotADirectoryError):
            return
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{p}: is {_kind(st.st_mode)}, where fastivim needs a folder of its "
                              f"own; fastivim never writes through a link (remove it)")


_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _write_fd(fd, payload) -> None:
    view = memoryview(payload)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_new(staged, payload: bytes, final=None) -> tuple:
    """Create ``staged`` (never an existing file, never through a link) holding ``payload``.

    A regular file already at ``staged`` (left by a killed process) is replaced once; a link, a
    folder or a special file there is refused.

    Parameters
    ----------
    staged : Path
        The staging name (:func:`partial_path` of ``final``, or a unique name).
    final : Path, optional
        The name the file is for; errors name it (default ``staged``).

    Returns
    -------
    tuple
        ``(st_dev, st_ino)`` of the file written, for :func:`commit_file` to check that the
        staged name still holds it.

    Raises
    ------
    OutputError
        One line naming ``final``: a link or special file at the staging name, or a write error
        (a full disk); a partly written file is removed.
    """
    staged = Path(staged)
    final = Path(final) if final is not None else staged
    for attempt in (0, 1):
        try:
            fd = os.open(staged, _WRITE_FLAGS, 0o644)
            break
        except FileExistsError:
            check_owned(staged)  # a link or special file: refused here
            if attempt:
                raise OutputError(f"{staged}: another process keeps creating this file; "
                                  f"is another fastivim writing here?") from None
            try:
                os.unlink(staged)  # a stale regular file of a killed process
            except FileNotFoundError:
                pass
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{staged}: is a symbolic link; fastivim never writes through "
                                  f"a link in its output folder (remove it)") from None
            raise OutputError(f"{final}: cannot write ({exc.strerror or exc})") from None
    try:
        _write_fd(fd, payload)
        st = os.fstat(fd)
    except OSError as exc:  # a full disk sets no file name on the error: name it here
        os.close(fd)
        _unlink_quietly(staged)
        raise OutputError(f"{final}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        os.close(fd)
        _unlink_quietly(staged)
        raise
    os.close(fd)
    return st.st_dev, st.st_ino


def commit_file(staged, final, identity: tuple | None = None) -> None:
    """Rename ``staged`` onto ``final`` after :func:`check_owned` of ``final``, and, given the
    ``identity`` :func:`write_new` returned, after checking that ``staged`` is still the file
    written (not swapped for a link by someone else who can write to the folder)."""
    check_owned(final)
    if identity is not None:
        try:
            st = os.lstat(staged)
            same = (st.st_dev, st.st_ino) == tuple(identity) and stat.S_ISREG(st.st_mode)
        except OSError:
            same = False
        if not same:
            raise OutputError(f"{staged}: the staged file was replaced or removed by another "
                              f"process; nothing of this run was made visible")
    try:
        os.replace(staged, final)
    except OSError as exc:
        raise OutputError(f"{final}: cannot write ({exc.strerror or exc})") from None


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_atomic(path, payload: bytes) -> None:
    """Write ``payload`` to :func:`partial_path` of ``path`` (:func:`write_new`), then rename it
    over ``path`` (:func:`commit_file`).

    An interrupted write leaves no file that looks finished, and no partial file either. For
    several files that must appear together, see :class:`fastivim.io.write.Staging`.
    """
    path = Path(path)
    check_owned(path)
    tmp = partial_path(path)
    identity = write_new(tmp, payload, final=path)
    try:
        commit_file(tmp, path, identity)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def create_once(path, payload: bytes) -> bool:
    """Create ``path`` with ``payload`` unless it exists; safe when several processes race.

    The content is written under a unique hidden name (``mkstemp``: ``O_EXCL``, never a link)
    and hard-linked to ``path``, which fails if another writer got there first (that file is
    kept). On a file system without hard links the staged file is renamed instead (the last of
    identical contents wins). Returns True when this call created ``path``.
    """
    import tempfile

    path = Path(path)
    check_owned(path)
    if os.path.lexists(path):
        return False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        try:
            os.fchmod(fd, 0o644)
            _write_fd(fd, payload)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            check_owned(path)
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV,
                                 errno.EMLINK):
                raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
            commit_file(tmp, path)
            return True
    finally:
        _unlink_quietly(tmp)


def json_bytes(obj) -> bytes:
    """The JSON text of every file fastivim writes: indented, UTF-8, no NaN/inf (an error)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_json_atomic(path, obj) -> None:
    """:func:`write_atomic` of :func:`json_bytes`."""
    write_atomic(path, json_bytes(obj))


# ------------------------------------------------------------------------------- reading

def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


@contextmanager
def open_regular(path, what: str, error=ValueError):
    """Open an input for reading, refusing anything but a regular file before reading a byte.

    Opened with ``O_NONBLOCK`` (a FIFO never blocks the open) and checked with ``fstat``
    (links are followed: an input may be a link to a regular file).

    Yields
    ------
    (file object, os.stat_result)

    Raises
    ------
    error
        One line naming the file: missing, unreadable, a folder, a FIFO, a device or a socket.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except PermissionError:
        raise error(f"{path}: cannot read {what} (permission denied)") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{path}: is a directory, expected {_a(what)}")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: is {_kind(st.st_mode)}, not a regular file; expected "
                        f"{_a(what)}")
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh, st


def _human_bytes(n: int) -> str:
    return f"{n / 1024 / 1024:.3g} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def read_small_bytes(path, what: str, error=ValueError, limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The bytes of a small regular file (:func:`open_regular`), at most ``limit`` of them.

    Raises
    ------
    error
        As :func:`open_regular`, or a file larger than ``limit`` (checked before reading, and
        again while reading, should the file grow).
    """
    with open_regular(path, what, error) as (fh, st):
        if st.st_size > limit:
            raise error(f"{path}: {what} of {_human_bytes(st.st_size)} is larger than the "
                        f"{_human_bytes(limit)} fastivim reads (is it the right file?)")
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
        if len(data) > limit:
            raise error(f"{path}: {what} is larger than the {_human_bytes(limit)} fastivim reads "
                        f"(is it the right file?)")
    return data


def read_small_text(path, what: str, error=ValueError, limit: int = SMALL_FILE_LIMIT) -> str:
    """:func:`read_small_bytes` decoded as UTF-8 (a byte-order mark is dropped)."""
    data = read_small_bytes(path, what, error, limit)
    try:
        return data.decode("utf-8-sig")  # -sig: editors may add a byte-order mark
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})"
                    ) from None


# ------------------------------------------------------------------------------- numbers

#: A plain decimal or scientific number, or nan/inf: ``800``, ``-1.5``, ``.5``, ``1e-3``,
#: ``2.E+3``. Not ``800_0``, ``0x1F``, ``1,5``, non-ASCII digits or inner spaces, all of which
#: Python's ``float`` accepts or misreads.
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                        r"|[+-]?(?:nan|inf|infinity)", re.IGNORECASE | re.ASCII)


def parse_number(token: str) -> float:
    """``token`` as a float when it is a plain decimal or scientific number (or nan/inf).

    Raises
    ------
    ValueError
        Anything else (``800_0``, ``0x10``, ``1:30``, ``٣``), naming the token (shortened).
    """
    if not isinstance(token, str) or _NUMBER_RE.fullmatch(token) is None:
        raise ValueError(f"{short_repr(token)} is not a number")
    return float(token)


# ------------------------------------------------------------------------------- messages

def short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters (messages never print a huge value).

    Containers are cut while they are being written, so a deep or shared structure costs no more
    than ``limit`` characters of work.
    """
    out = []
    size = [0]

    def emit(s):
        out.append(s)
        size[0] += len(s)
        return size[0] < limit

    def walk(v, depth):
        if size[0] >= limit:
            return False
        if isinstance(v, (list, tuple, dict)) and depth < 20:
            opening, closing = ("{", "}") if isinstance(v, dict) else (
                ("[", "]") if isinstance(v, list) else ("(", ")"))
            if not emit(opening):
                return False
            items = v.items() if isinstance(v, dict) else v
            for i, item in enumerate(items):
                if i and not emit(", "):
                    return False
                if isinstance(v, dict):
                    if not walk(item[0], depth + 1) or not emit(": "):
                        return False
                    item = item[1]
                if not walk(item, depth + 1):
                    return False
            return emit(closing)
        r = repr(v) if not isinstance(v, str) or len(v) <= limit else repr(v[:limit])
        return emit(r)

    walk(value, 0)
    text = "".join(out)
    return text if len(text) <= limit else text[:limit] + "..."


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type name when the message is empty)."""
    return " ".join((str(exc).strip() or type(exc).__name__).split())
