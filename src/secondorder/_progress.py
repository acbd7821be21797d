"""Optional progress of long library calls (the Hessian, the saddle report, ``minimize``).

A long function takes ``progress=``: ``False`` or ``None`` (the default) says nothing; ``True``
writes one status line to stderr (redrawn in place on a terminal, a new line every few seconds
in a log file, and a last line with the elapsed time); a callable receives a
:class:`ProgressEvent` at every step instead. Inner loops that do not know who called them
report through :func:`tick`, which reaches the reporter of the innermost :func:`reporting`
block, if any.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from secondorder.errors import InvalidTypeError

__all__ = ["ProgressArg", "ProgressEvent", "Reporter", "format_seconds", "reporting", "tick"]


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long call: ``done`` of ``total`` (None: unknown) units of ``stage``."""

    what: str
    stage: str
    done: int
    total: int | None
    elapsed: float
    finished: bool = False


ProgressArg = bool | None | Callable[[ProgressEvent], None]


def format_seconds(s: float) -> str:
    """``75.2`` → ``'1m15s'``; ``3.21`` → ``'3.2s'``; hours as ``'2h05m'``."""
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class Reporter:
    """Where the steps of one long call go (see the module doc); a falsy ``progress`` makes
    every method a no-op."""

    def __init__(self, progress: ProgressArg, what: str, *, stream=None) -> None:
        if progress is not None and not isinstance(progress, bool) and not callable(progress):
            raise InvalidTypeError(
                f"progress must be True, False or a callable, got {type(progress).__name__}"
            )
        self.what = what
        self.callback = progress if callable(progress) else None
        self.enabled = bool(progress)
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self._last_print = -1e9
        self._width = 0
        self.stage = ""
        self.total: int | None = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, done: int, total: int | None = None, stage: str | None = None) -> None:
        """``done`` of ``total`` units of ``stage`` (the stage and total so far when None)."""
        if not self.enabled:
            return
        if stage is not None:  # a new stage: its own total (None: unknown)
            self.stage, self.total = stage, total
        elif total is not None:
            self.total = total
        event = ProgressEvent(self.what, self.stage, int(done), self.total, self.elapsed)
        if self.callback is not None:
            self.callback(event)
            return
        tty = self.stream.isatty()
        # a terminal redraws often; a log file gets a line every few seconds
        if event.elapsed - self._last_print < (0.2 if tty else 5.0):
            return
        self._last_print = event.elapsed
        self._emit(self._line(event), tty)

    def _line(self, e: ProgressEvent) -> str:
        count = f"{e.done}/{e.total}" if e.total else str(e.done)
        stage = f" {e.stage}" if e.stage else ""
        return f"{self.what}:{stage} {count}, {format_seconds(e.elapsed)}"

    def _emit(self, text: str, tty: bool) -> None:
        if tty:
            pad = " " * max(0, self._width - len(text))
            self.stream.write(f"\r{text}{pad}")
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, note: str = "done") -> None:
        """The last line (``note`` and the elapsed time), or the callback's last event."""
        if not self.enabled:
            return
        if self.callback is not None:
            self.callback(ProgressEvent(self.what, note, 0, None, self.elapsed, True))
            return
        text = f"{self.what}: {note} in {format_seconds(self.elapsed)}"
        self._emit(text, self.stream.isatty())
        if self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


_active: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar(
    "secondorder_progress", default=None
)


@contextlib.contextmanager
def reporting(progress: ProgressArg, what: str) -> Iterator[Reporter]:
    """A :class:`Reporter` for the block, reachable from inner loops through :func:`tick`;
    closed at the end of the block (also when it raises)."""
    reporter = Reporter(progress, what)
    # a silent call inside a reported one (the Hessian of the saddle report) leaves its
    # steps to the outer reporter
    token = _active.set(reporter) if reporter.enabled else None
    ok = False
    try:
        yield reporter
        ok = True
    finally:
        if token is not None:
            _active.reset(token)
        reporter.close("done" if ok else "stopped")


def tick(done: int, total: int | None = None, stage: str | None = None) -> None:
    """Report a step to the innermost active reporter (nothing when there is none)."""
    reporter = _active.get()
    if reporter is not None:
        reporter.update(done, total, stage)
