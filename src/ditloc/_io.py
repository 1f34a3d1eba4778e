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
import time
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
#: how long a refused process waits for the holder's PID to appear (the holder writes it just after taking the lock)
PID_WAIT_SECONDS = 2.0

#: lock files this process holds for a whole command (``reentrant``): path -> lock
_held: dict[Path, OutputLock] = {}


class OutputLock:
    """An advisory lock that makes one process the only writer of an output folder.

    ``with OutputLock(out):`` takes ``<out>/.ditloc.lock`` with ``fcntl.flock`` on the
    open file, held until the block ends: taking it is one atomic call, and the kernel
    drops it when its holder dies, so a stale lock of a killed process (even ``kill -9``)
    is simply taken over. The holder writes its PID into the file, and clears it on
    release; a second process is refused with one line naming that PID.

    ``reentrant``: the lock is held for a whole command (the CLI takes it before any work);
    an ``OutputLock`` of the same file that this process enters meanwhile (the API the
    command calls) passes. Otherwise a second ``OutputLock`` of the file is refused, in this
    process too. On a failure, a folder that the lock created and that holds nothing but
    the lock file is removed again. Where ``fcntl`` does not exist the lock is a no-op.
    """

    def __init__(self, out, name: str = LOCK_FILE, *, reentrant: bool = False):
        self.out = Path(out)
        self.name = name  # one lock file per writer slot (e.g. per rank of one multi-process run)
        self.reentrant = reentrant
        self._file = None
        self._nested = False
        self._created = False

    @property
    def path(self) -> Path:
        return self.out / self.name

    def _key(self) -> Path:
        return Path(os.path.realpath(self.out)) / self.name

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        if self._key() in _held:  # held by this process for its whole command
            self._nested = True
            return self
        self._created = not self.out.exists()
        deadline = time.monotonic() + PID_WAIT_SECONDS
        while True:
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                f = open(self.path, "a+")
            except FileNotFoundError:  # the folder was removed meanwhile (a failed holder tidied up)
                continue
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(f)
                f.close()
                if holder is None and time.monotonic() < deadline:  # its holder is writing its PID
                    time.sleep(0.005)
                    continue
                from .errors import DitlocError

                raise DitlocError(f"{self.out} is being written by another ditloc process (PID {holder or 'unknown'}); "
                                  "wait for it to finish or use another output directory") from None
            if _same_file(f, self.path):
                break
            f.close()  # locked a file its holder removed on release: take the one there now
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        if self.reentrant:
            _held[self._key()] = self
        return self

    def __exit__(self, *exc) -> None:
        if self._nested:
            self._nested = False
            return
        if self._file is None:
            return
        if _held.get(self._key()) is self:
            del _held[self._key()]
        f, self._file = self._file, None
        f.seek(0)
        f.truncate()  # no PID: nobody holds it
        f.flush()
        tidy = exc[0] is not None and self._created
        if tidy and [p.name for p in self.out.iterdir()] == [self.name]:  # failed before writing anything
            self.path.unlink()  # while still held: a waiting process re-checks the file it locked
            try:
                self.out.rmdir()
            except OSError:
                pass
        f.close()  # closing the descriptor releases the lock


def _holder(f) -> int | None:
    """The PID in a lock file when it names a live process (None: empty, or a dead holder's)."""
    f.seek(0)
    first = f.read().split("\n", 1)[0].strip()
    if not first.isdigit():
        return None
    pid = int(first)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return pid


def _same_file(f, path: Path) -> bool:
    """Whether the open file `f` is still the file at `path` (not removed or replaced since it was opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


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
