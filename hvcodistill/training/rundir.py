"""The run directory: one job at a time, its entries of the right kind, and one directory that
every node shares.

All are checked before anything of the run is written there, so a refused start leaves run.dir
as it was. Pure file-system helpers; the ranks' agreement is the caller's.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import socket
from pathlib import Path

from hvcodistill.errors import ConfigError

MARKERS = ".writers"  # run.dir/.writers/model_<i>.<host>.<token>, removed after the check
LOCK = ".lock"  # run.dir/.lock: flock-ed by the job that runs there, names its pid and host


class RunDirLock:
    """An exclusive flock on run.dir/.lock, held until `release()` or the end of the process.
    `warning`: why nothing is held (a file system without flock), for the caller to say."""

    def __init__(
        self, path: Path, fd: int | None, *, created_dir: bool = False, warning: str | None = None
    ):
        self.path, self._fd, self._created_dir, self.warning = path, fd, created_dir, warning

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file and let go; run.dir too if this lock created it and it is empty."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        atexit.unregister(self.release)
        # unlinked while still held: a job that opened this file meanwhile finds it replaced
        # (lock() compares inodes) and takes the new one
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(fd)
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()


def lock(run_dir: Path) -> RunDirLock:
    """Take run.dir for this job (creating it), or refuse because another job holds it: two jobs
    on one run.dir interleave their metrics and overwrite each other's checkpoints."""
    run_dir = Path(run_dir)
    path, created = run_dir / LOCK, False
    for _ in range(10):
        created = _make_dir(run_dir) or created
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a job releasing run.dir removed it just now: again
            continue
        except OSError as e:
            raise ConfigError(f"run.dir {run_dir} cannot be written: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").split()
            os.close(fd)
            who = (
                f"pid {holder[0]} on host {holder[1]}"
                if len(holder) == 2
                else "pid and host not yet written"
            )
            raise ConfigError(
                f"run.dir {run_dir} is in use by another job ({who}); wait for it to end "
                "or use another run.dir"
            ) from None
        except OSError as e:  # the file system takes no flock (some Lustre mounts)
            os.close(fd)
            return RunDirLock(
                path,
                None,
                warning=f"run.dir {run_dir} cannot be locked ({e.strerror or e}): "
                "nothing stops a second job from using it at the same time",
            )
        if _same_file(fd, path):
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            except OSError as e:
                os.close(fd)
                raise ConfigError(
                    f"run.dir {run_dir} cannot be written: {e.strerror or e}"
                ) from None
            held = RunDirLock(path, fd, created_dir=created)
            atexit.register(held.release)
            return held
        os.close(fd)  # locked a file its holder had just removed: the new one
    raise ConfigError(
        f"run.dir {run_dir}: its lock file {path} keeps being replaced; "
        "is another job starting there?"
    )


def _make_dir(run_dir: Path) -> bool:
    """Create run.dir (and its parents); True if this call created it."""
    existed = run_dir.is_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(
            f"run.dir {run_dir} is a file, not a directory: use another run.dir"
        ) from None
    except OSError as e:
        raise ConfigError(f"run.dir {run_dir} cannot be created: {e.strerror or e}") from None
    return not existed


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino)


def check_entries(run_dir: Path, n_models: int) -> None:
    """Each path the run writes is absent or of the kind the run writes (a file or a directory)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir {run_dir} is a file, not a directory: use another run.dir")
    files = [
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        *(f"model_{m}.pt" for m in range(n_models)),
    ]
    dirs = [
        "checkpoints",
        "tb",
        *(f"{d}/model_{m}" for d in ("checkpoints", "tb") for m in range(n_models)),
    ]
    for names, is_kind, kind in (
        (files, Path.is_file, "a file"),
        (dirs, Path.is_dir, "a directory"),
    ):
        for name in names:
            p = run_dir / name
            if (p.exists() or p.is_symlink()) and not is_kind(p):
                raise ConfigError(
                    f"run.dir entry {p} should be {kind} (the run writes it as one), but it is "
                    "not: move it away or use another run.dir"
                )


def leave_marker(run_dir: Path, model_id: int, host: str, token: str) -> Path:
    """A checkpoint writer's mark in run.dir, for world rank 0 to look for."""
    directory = run_dir / MARKERS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"model_{model_id}.{host}.{token}"
    path.write_text(f"{host}\n")
    return path


def check_markers(run_dir: Path, writers: dict[int, str], token: str, host: str) -> None:
    """World rank 0 (on `host`) sees the mark of every model's writer ({model: its host}), or
    run.dir is not one shared directory: resuming would find some models' checkpoints missing."""
    directory = run_dir / MARKERS
    seen = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    for model_id, writer_host in sorted(writers.items()):
        if f"model_{model_id}.{writer_host}.{token}" not in seen:
            raise ConfigError(
                f"run.dir {run_dir} is not one directory shared by every node: world rank 0 "
                f"(on {host}) cannot see what model {model_id}'s checkpoint writer "
                f"(on {writer_host}) wrote there; put run.dir on a file system that every node "
                "mounts at the same path"
            )


def remove_marker(path: Path | None, run_dir: Path, *, last: bool) -> None:
    """Remove this writer's mark; `last` (one rank, after everyone's): the markers' directory
    too."""
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    if last:
        with contextlib.suppress(OSError):
            (run_dir / MARKERS).rmdir()
