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
