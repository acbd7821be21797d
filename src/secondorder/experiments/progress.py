"""What a run shows and listens to while it trains: progress bars, SIGINT / SIGTERM, threads."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any

import torch
from tqdm import tqdm

from secondorder._format import format_number

__all__ = ["Progress", "StopFlag", "threads"]


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
