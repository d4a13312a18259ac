"""The files a run reads and writes, checked before any work: a run that cannot read its input
or write its output should say so at once, naming the path, not after every frame was
explained. Outputs are written to a temporary file renamed into place, which would replace
whatever the name held: so a name that is a folder, a device, a pipe or one of the run's
inputs is refused, and a symbolic link is followed (its target gets the new file, the link
stays)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import RSPError


def check_readable(path: Path, what: str) -> None:
    """A file this process can read, or an RSPError saying what is wrong with the path."""
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
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise RSPError(f"{what} {text!r} is a folder: give a file name inside it")
    target = Path(os.path.realpath(text))  # a link's target is what gets replaced
    if target.exists() and not target.is_file():
        raise RSPError(f"{what} {text!r} exists and is not a regular file (a device, pipe or socket): choose another path")
    for kind, source in inputs:
        if source is not None and target == Path(os.path.realpath(source)):
            raise RSPError(f"{what} {text!r} is the {kind} {str(source)!r}: choose another path")
    _check_folder_writable(target.parent, what, text)
    return target


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


def check_outputs_spare_inputs(outputs, inputs) -> None:
    """Outputs named after the inputs (``cat_overlay.png`` for ``cat.jpg``, in a folder of
    pictures) must not replace one of them: (what, path) pairs both."""
    sources = {os.path.realpath(path): (kind, path) for kind, path in inputs}
    for what, path in outputs:
        hit = sources.get(os.path.realpath(path))
        if hit is not None:
            raise RSPError(f"{what} {str(path)!r} would replace the {hit[0]} {str(hit[1])!r}: choose another output folder")
