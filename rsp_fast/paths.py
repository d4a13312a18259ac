"""The files a run reads and writes, checked before any work: a run that cannot read its input
or write its output should say so at once, naming the path, not after every frame was
explained. Outputs are written to a temporary file renamed into place, which would replace
whatever the name held: so a name that is a folder, a device, a pipe or one of the run's
inputs is refused, and a symbolic link is followed (its target gets the new file, the link
stays)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import RSPError

NAME_MAX = 255  # bytes in one file name (Linux's and macOS's file systems)
PATH_MAX = 4096  # bytes in a whole path, with its closing NUL (Linux's; macOS's is 1024)


def temporary_sibling(path: Path, suffix: str = "") -> Path:
    """A hidden name beside ``path`` to write it under before the rename into place, this
    process's own, within NAME_MAX: a long output name (itself allowed) would otherwise fail
    at the first write, naming the temporary file. ``suffix``: what tells the writer the format."""
    tag = f".tmp-{os.getpid()}{suffix}"
    name, room = path.name, NAME_MAX - 1 - len(tag.encode())
    stored = os.fsencode(name)  # the bytes on disk (a name that is not UTF-8 included)
    if len(stored) > room:  # cut on a character, made unique again by a digest of the whole name
        digest = hashlib.sha1(stored).hexdigest()[:8]
        name = stored[:room - 9].decode(errors="ignore") + "-" + digest
    return path.with_name(f".{name}{tag}")


def write_atomically(path: Path, write: Callable[[Path], None], what: str = "", suffix: str = "") -> None:
    """``write`` the file under a temporary sibling name, then rename it into place: never a
    half-written file. An OSError (a full disk) becomes an RSPError naming ``path``, not the
    temporary file. ``what``: the file's role in the message; ``suffix``: see temporary_sibling.
    A symbolic link's target gets the file, the link stays (a rename onto the link replaced it)."""
    target = Path(os.path.realpath(path))
    tmp = temporary_sibling(target, suffix)
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise RSPError(f"cannot write {what + ' ' if what else ''}{str(path)!r}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def check_readable(path: Path, what: str) -> None:
    """A file this process can read, or an RSPError saying what is wrong with the path."""
    check_name_length(path, what)
    if path.is_dir():
        raise RSPError(f"{what} {str(path)!r} is a folder, not a file")
    if path.exists() and not path.is_file():
        raise RSPError(f"{what} {str(path)!r} is not a regular file (a device, pipe or socket)")
    if not path.is_file():
        raise RSPError(f"{what} {str(path)!r} does not exist")
    if not os.access(path, os.R_OK):
        raise RSPError(f"cannot read {what} {str(path)!r}: permission denied")


def checked_output_file(path: str | Path, what: str, inputs=()) -> Path:
    """The file to write ``what`` (e.g. "output video") to, or an RSPError naming why it cannot
    be. ``inputs``: the run's other files as (what it is, path) pairs, e.g. ("input video", src),
    which the output must not replace."""
    text = _given(path, what)
    check_name_length(Path(text), what)  # first: the file system refuses to look such a name up
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise RSPError(f"{what} {text!r} is a folder: give a file name inside it")
    target = Path(os.path.realpath(text))  # a link's target is what gets replaced
    if target.exists() and not target.is_file():
        raise RSPError(f"{what} {text!r} exists and is not a regular file (a device, pipe or socket): choose another path")
    for kind, source in inputs:
        if source is not None and target == Path(os.path.realpath(source)):
            raise RSPError(f"{what} {text!r} is the {kind} {str(source)!r}: choose another path")
    check_path_length(target, what, text)
    _check_folder_writable(target.parent, what, text)
    return target


def check_path_length(target: Path, what: str, text: str) -> None:
    """An output whose temporary sibling still fits a path (a legal 4095-byte output path failed
    at its first write, after the model was built)."""
    limit = _path_max(target.parent) - 1  # the longest path the system takes (its limit counts the closing NUL)
    tmp = len(os.fsencode(str(temporary_sibling(target, target.suffix or ".mp4"))))
    if tmp > limit:
        raise RSPError(f"{what} {text!r}: the temporary file the run writes beside it would have a path of {tmp} "
                       f"bytes, more than the {limit} the system takes: choose a shorter path")


def _path_max(folder: Path) -> int:
    """The system's limit on a path's length there (the nearest folder that exists asked)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer
        return PATH_MAX
    return min(limit, PATH_MAX) if limit > 0 else PATH_MAX  # -1: no limit of the file system's own


def checked_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """The folder to write files into (created later, when there is something to write)."""
    text = _given(path, what)
    folder = Path(text)
    if folder.exists() and not folder.is_dir():
        raise RSPError(f"{what} {text!r} is a file")
    _check_folder_writable(folder, what, text)
    return folder


def _given(path: str | Path, what: str) -> str:
    text = str(path)
    if not text.strip():
        raise RSPError(f"{what}: the path is empty")
    return text


def _check_folder_writable(folder: Path, what: str, text: str) -> None:
    """The folder, or the nearest part of it that exists (the rest is created), must be a
    folder this process can write into."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RSPError(f"{what} {text!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RSPError(f"{what} {text!r}: no permission to write into the folder {str(existing)!r}")
    # Permissions can say yes where nothing can be made (/proc, /sys, read-only mounts, for root):
    # try one file in the nearest existing folder, which is also where the missing ones would go.
    try:
        tempfile.TemporaryFile(dir=existing, prefix=".rsp-fast-probe-").close()
    except OSError as exc:
        raise RSPError(f"{what} {text!r}: cannot create a file in the folder {str(existing)!r} "
                       f"({exc.strerror or exc})") from None


def check_name_length(path: Path, what: str) -> None:
    """A file name the file system can hold (each name in the path is limited, not the path)."""
    if any(len(os.fsencode(part)) > NAME_MAX for part in path.parts):  # bytes: a Latin-1 name is no UTF-8
        raise RSPError(f"{what} {str(path)!r}: a name in it is longer than the {NAME_MAX} bytes a file system holds")


def check_outputs_spare_inputs(outputs, inputs) -> None:
    """Outputs named after the inputs (``cat_overlay.png`` for ``cat.jpg``, in a folder of
    pictures) must fit a file name, be no folder, device or pipe (a link: its target) and not
    replace one of the inputs: (what, path) pairs both. Their folder is checked once, by the
    caller (checked_output_folder): one probe file for the run, not one per output."""
    sources = {os.path.realpath(path): (kind, path) for kind, path in inputs}
    for what, path in outputs:
        check_name_length(Path(path), what)
        target = Path(os.path.realpath(path))
        check_path_length(target, what, str(path))
        if target.is_dir():
            raise RSPError(f"{what} {str(path)!r} is a folder: remove it or choose another output folder")
        if target.exists() and not target.is_file():
            raise RSPError(f"{what} {str(path)!r} exists and is not a regular file (a device, pipe or socket): "
                           "choose another output folder")
        hit = sources.get(str(target))
        if hit is not None:
            raise RSPError(f"{what} {str(path)!r} would replace the {hit[0]} {str(hit[1])!r}: choose another output folder")
