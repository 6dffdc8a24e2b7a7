"""Atomic file writes (a reader never sees a half-written file: write to a temp file, then rename) and the run
directory lock (one process per run directory)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_savefig", "RunDirLock", "RunDirLockedError"]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (same-directory temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``fig.savefig`` to a same-directory temp file, then ``os.replace`` (a killed job leaves no half-written PNG);
    the format comes from ``path``'s suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
        fig.savefig(tmp, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON atomically.

    >>> import tempfile, json, pathlib
    >>> p = atomic_write_json(pathlib.Path(tempfile.mkdtemp()) / "r.json", {"a": 1})
    >>> json.loads(p.read_text())
    {'a': 1}
    """
    return atomic_write_text(path, json.dumps(payload, indent=2, default=_default) + "\n")


def _default(o: Any) -> Any:
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


class RunDirLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


_HELD: dict[str, RunDirLock] = {}  # locks this process holds, by lock file (a second acquire re-enters)


class RunDirLock:
    """An exclusive lock on a run directory: ``<run_dir>/.lock``, held while one process writes the run.

    With ``fcntl`` (Linux, macOS) the lock is ``flock`` on the open file: the operating system releases it when the
    process ends in any way (including ``kill -9``), so a killed run never leaves a stale lock. Without ``fcntl``
    (Windows) the file is created exclusively and holds the owner's pid; a lock whose pid no longer runs is stale
    and taken over. The file always holds the holder's pid, which the refusal names. Acquiring a lock this process
    already holds re-enters it (released when every acquire is released).

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with RunDirLock(d) as lock:
    ...     lock.holder_pid() == os.getpid()
    True
    """

    def __init__(self, run_dir: str | os.PathLike, name: str = "run_dir") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self.name = name
        self._fd: int | None = None
        self._depth = 0

    def holder_pid(self) -> int | None:
        """The pid written in the lock file (``None`` when absent or unreadable)."""
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _refuse(self) -> RunDirLockedError:
        pid = self.holder_pid()
        who = f"process {pid}" if pid is not None else "another process"
        return RunDirLockedError(
            f"`{self.name}`={str(self.run_dir)!r} is in use by {who} (lock file {self.path}); two runs in one "
            f"run directory would overwrite each other's checkpoints, logs and config. Wait for it to finish (or "
            f"stop it), or choose another {self.name}"
        )

    def acquire(self) -> RunDirLock:
        """Take the lock or raise :class:`RunDirLockedError` naming the run directory and the holder's pid."""
        key = str(self.path.absolute())
        held = _HELD.get(key)
        if held is not None and held is not self:
            held._depth += 1
            self._fd, self._depth = None, 1
            self._reentered = held
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            self._acquire_portable()
        else:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._refuse() from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
        self._depth = 1
        _HELD[key] = self
        return self

    def _acquire_portable(self) -> None:  # pragma: no cover - exercised only without fcntl
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = self.holder_pid()
                if pid is not None and _pid_alive(pid):
                    raise self._refuse() from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
            return
        raise self._refuse()

    def release(self) -> None:
        """Release one acquire (the lock itself when the last one is released)."""
        other = getattr(self, "_reentered", None)
        if other is not None:
            self._reentered = None
            other.release()
            return
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth:
            return
        _HELD.pop(str(self.path.absolute()), None)
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock (the file stays, harmless)
            self._fd = None
        else:  # pragma: no cover - portable fallback
            if self.holder_pid() == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:  # pragma: no cover - portable fallback
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
