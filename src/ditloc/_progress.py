"""Progress bars for ditloc's long phases: tqdm on stderr, as diffusers draws its own.

Bars draw only when stderr is a terminal (tqdm's ``disable=None``), so logs,
pipes and tests get ditloc's plain lines and no carriage-return noise.
``TQDM_DISABLE=0`` forces the bars on, ``TQDM_DISABLE=1`` off. Print lines
through :func:`write` while a bar is open, so they land above it.

    with bar(desc="bench", unit="unit", total=n) as units:
        with bar(desc=unit.id, unit="step", leave=False) as steps, count_steps(pipe, steps, calls=2):
            pipe(...); pipe(...)             # every denoising step advances `steps`
        units.update()
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from tqdm.auto import tqdm


def disabled() -> bool | None:
    """tqdm's `disable`: None (off when stderr is not a terminal), unless TQDM_DISABLE says 0 (on) or 1 (off)."""
    value = os.environ.get("TQDM_DISABLE", "").strip().lower()
    if not value:
        return None
    return value not in ("0", "false", "no", "off")


def showing() -> bool:
    """Whether bars are drawn here and now."""
    off = disabled()
    if off is not None:
        return not off
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar(total: int | None = None, *, desc: str | None = None, unit: str = "it", leave: bool = True,
        position: int | None = None, off: bool = False) -> tqdm:
    """A bar on stderr (`off`: never drawn, e.g. on every process but the first)."""
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, position=position, file=sys.stderr,
                dynamic_ncols=True, disable=True if off else disabled())


def write(message: str) -> None:
    """One line on stderr, above any open bar."""
    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


class _Steps:
    """Stands in for one pipeline call's own step bar: each step advances `bar`."""

    def __init__(self, bar: tqdm, iterable=None):
        self.bar, self.iterable = bar, iterable

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.bar.update(1)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def count_steps(pipe, bar: tqdm, *, calls: int | None = None):
    """While open, the denoising steps of `pipe`'s calls advance `bar` in place of the
    pipeline's own bar (``pipe.progress_bar``, restored on exit). With `calls`, the
    first call sets the bar's total to `calls` x its steps (so the bar has an ETA)."""
    own = vars(pipe)
    had, previous = "progress_bar" in own, own.get("progress_bar")

    def progress_bar(iterable=None, total=None):
        steps = total if total is not None else len(iterable)
        if calls is not None and bar.total is None:
            bar.total = calls * int(steps)
            bar.refresh()
        return _Steps(bar, iterable)

    own["progress_bar"] = progress_bar
    try:
        yield bar
    finally:
        if had:
            own["progress_bar"] = previous
        else:
            own.pop("progress_bar", None)


def elapsed(start: float) -> str:
    """Wall time since `start` (a time.time()) as tqdm shows it, e.g. 01:05 or 1:02:03."""
    return tqdm.format_interval(time.time() - start)
