"""Local files the record is made of, written whole or not at all, and the free space they need.

`write` puts a file in place atomically (a sibling temporary file, then a rename): a reader sees the
old file or the new one, and a write that fails (a full disk, a read-only folder) leaves the old file
as it was and no temporary file behind. A full disk becomes `NoSpace`, a PipelineError naming the
file and the space left, so the runner can say it in one line instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from lib.errors import PipelineError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpace(PipelineError, OSError):
    """A file could not be written for lack of space (or quota) on its disk."""


def free_bytes(folder: Path) -> int:
    """The space left for this process in `folder` (or its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def size(n: int | float) -> str:
    """1536 → '1.5 KiB': how free space and needs are said."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def is_no_space(err: BaseException) -> bool:
    return isinstance(err, NoSpace) or (isinstance(err, OSError) and err.errno in NO_SPACE)


def no_space(path: Path, err: OSError) -> NoSpace:
    """The error to raise when writing `path` failed with `err` for lack of space."""
    found = NoSpace(f"no space left to write {path} ({size(free_bytes(Path(path).parent))} free there)")
    found.errno = err.errno
    return found


def write(path: Path, data: bytes | str, mode: int | None = None) -> Path:
    """Write `data` to `path` whole or not at all (see the module). `mode`: the file's permissions
    (default: as a new file gets them)."""
    path = Path(path)
    body = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        if err.errno in NO_SPACE:
            raise no_space(path, err) from None
        raise
    return path


def remove_leftovers(folder: Path) -> list[Path]:
    """The temporary files a writer killed mid-write left in `folder` and below (`write`'s
    `.<name>.<pid>.tmp`): removed, and returned. Call it when no writer of the folder is alive."""
    found = [p for p in Path(folder).rglob(".*.tmp") if p.name.rsplit(".", 2)[-2].isdigit()]
    for path in found:
        path.unlink(missing_ok=True)
    return found
