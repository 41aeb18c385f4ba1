"""One way to write a file that a crash or a full disk never leaves half-written.

The durability rule, for every file a run leaves (checkpoints and their sidecars, config.yaml,
summary.json, the final models, a trimmed metrics.jsonl): write a temporary file in the same
directory, fsync it, rename it over the target, fsync the directory. A reader sees the old file
or the new one, never part of one; on any failure the temporary file is removed and the error
raised, so nothing partial is left behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` durably (temporary file, fsync, rename, fsync the directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
