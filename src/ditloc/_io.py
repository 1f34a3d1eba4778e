"""Atomic file writes: the one helper every writer of ditloc uses.

A file is written to a uniquely named temporary beside its destination (so
concurrent writers never share one) and moved into place
with ``os.replace``, so a reader (or a rerun after a kill) sees the old file or
the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write `data` to `path` atomically and return `path`.

    `data`: text (UTF-8), bytes, or a function that writes the temporary file it
    is given (e.g. ``lambda tmp: save_file(tensors, tmp)``). Parent folders are
    created. The file gets the usual permissions (0666 less the umask), also when
    the writer creates it 0600 (safetensors does).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # unique per writer
    os.close(fd)
    tmp = Path(name)
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path, data, *, indent: int | None = 1, allow_nan: bool = True) -> Path:
    """``data`` as JSON, written atomically (``allow_nan=False``: a NaN fails before the file is touched)."""
    return write_atomic(path, json.dumps(data, indent=indent, allow_nan=allow_nan))


LOCK_FILE = ".ditloc.lock"


class OutputLock:
    """An advisory lock that makes one process the only writer of an output folder.

    ``with OutputLock(out):`` takes ``<out>/.ditloc.lock`` (``fcntl.flock``, so the
    kernel drops it when its holder dies: a stale lock from a killed process is
    simply taken over) and writes the holder's PID into it. A second process is
    refused with one line naming that PID. Where ``fcntl`` does not exist the
    lock is a no-op.
    """

    def __init__(self, out, name: str = LOCK_FILE):
        self.out = Path(out)
        self.name = name  # one lock file per writer slot (e.g. per rank of one multi-process run)
        self._file = None

    def __enter__(self) -> "OutputLock":
        from .errors import DitlocError

        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        f = open(self.out / self.name, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise DitlocError(f"{self.out} is being written by another ditloc process (PID {holder}); "
                              "wait for it to finish or use another output directory") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the lock
            self._file = None


class ResultStore:
    """An append-only JSONL file of finished units, one line each: a kill loses at most the
    line being written (torn, ignored on read and cut off before the next append)."""

    def __init__(self, path):
        self.path = Path(path)
        self._repaired = False

    @staticmethod
    def read(path) -> list[dict]:
        """The complete lines' records; a last line without its newline (torn by a kill) is ignored."""
        path = Path(path)
        if not path.exists():
            return []
        data = path.read_bytes()
        lines = data.split(b"\n")[:-1]  # the piece after the last newline is torn or empty
        records = []
        for n, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                from .errors import DitlocError

                raise DitlocError(f"{path}:{n}: not a JSON line; the store is damaged (move it away and rerun "
                                  "to recompute its units)") from None
        return records

    def _repair(self) -> None:
        """Cut a torn last line off, so the next record starts on a line of its own."""
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
                    f.flush()
                    os.fsync(f.fileno())
        self._repaired = True

    def append(self, record: dict) -> None:
        if not self._repaired:
            self._repair()
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
