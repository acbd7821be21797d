"""What a run shows and listens to while it trains: progress bars, SIGINT / SIGTERM, threads."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import warnings
from typing import Any

import torch
from tqdm import tqdm

from secondorder._format import format_number
from secondorder._progress import format_seconds
from secondorder.errors import ModeNote

__all__ = ["Progress", "RunProgress", "StopFlag", "threads", "warning_line"]


def warning_line(solver: str, warning: warnings.WarningMessage) -> str:
    """How a warning caught from a solver is shown: a documented mode
    (:class:`~secondorder.errors.ModeNote`) as a note, anything else as a warning."""
    kind = "note" if issubclass(warning.category, ModeNote) else "warning"
    return f"{kind} ({solver}): {warning.message}"


@contextlib.contextmanager
def threads(n: int):
    """Use n torch threads inside the block (0: leave as is), then restore."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


class StopFlag:
    """SIGINT / SIGTERM set a flag the solvers' callback reads; a second signal acts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now (the last checkpoint stays)
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing the current iteration and writing a "
            "checkpoint (send again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    @property
    def set(self) -> bool:
        return self.signum is not None


class Progress:
    def __init__(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        self.bar = None
        if enabled:
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                file=sys.stderr,
                unit="it",
                dynamic_ncols=True,
                leave=True,
                # a terminal redraws in place; a log file gets a line every few seconds
                mininterval=0.2 if sys.stderr.isatty() else 5.0,
            )

    def update(self, row: dict[str, Any], k: int) -> None:
        if self.bar is None:
            return
        bits = []
        f = row.get("f")
        if isinstance(f, float):
            bits.append(f"f={format_number(f, 5)}")
        g = row.get("grad_norm")
        if isinstance(g, float):
            bits.append(f"|g|={format_number(g, 3)}")
        for key, short in (
            ("train_accuracy", "acc"),
            ("dev_accuracy", "dev"),
            ("test_accuracy", "test"),
        ):
            v = row.get(key)
            if isinstance(v, float):
                bits.append(f"{short}={format_number(v, 4)}")
        self.bar.set_postfix_str(" ".join(bits), refresh=False)
        self.bar.update(max(0, k - self.bar.n))  # redraws no more often than mininterval

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunProgress:
    """One overall line before each solver of a run with several: how far the run is, the
    time so far and an estimate of the time left (the mean time of the solvers run so far,
    times the solvers left)."""

    def __init__(self, cells: list, enabled: bool, log) -> None:
        self.n_cells = len(cells)
        self.total = sum(len(c.spec["solvers"]) for c in cells)
        self.enabled = enabled and self.total > 1
        self.log = log
        self.start = time.perf_counter()
        self.done = 0  # solvers finished (or skipped as finished) so far
        self.timed: list[float] = []
        self._began: float | None = None

    def solver(self, cell_index: int, name: str, skipped: bool = False) -> None:
        """Solver ``name`` of cell ``cell_index`` starts (or is skipped: finished before)."""
        now = time.perf_counter()
        if self._began is not None:
            self.timed.append(now - self._began)
        self._began = None if skipped else now
        self.done += 1
        if skipped or not self.enabled:
            return
        cell = f", cell {cell_index + 1}/{self.n_cells}" if self.n_cells > 1 else ""
        left = ""
        if self.timed:
            mean = sum(self.timed) / len(self.timed)
            left = f", estimate {format_seconds(mean * (self.total - self.done + 1))} left"
        self.log(
            f"solver {self.done}/{self.total}{cell} ({name}), elapsed "
            f"{format_seconds(now - self.start)}{left}"
        )
