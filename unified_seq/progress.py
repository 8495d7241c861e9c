"""Progress lines for long work (training steps, evaluation batches), with rates and ETAs.

Printed on process 0's stdout: absl logging is quiet by default, and a user
watching a run wants to know how far it is and how long it has left.
"""

from __future__ import annotations

import math
import time

import jax


def say(line: str) -> None:
    """A progress line on process 0's stdout."""
    if jax.process_index() == 0:
        print(line, flush=True)


def format_eta(seconds: float) -> str:
    """`1h05m`, `4m07s`, or `?` when the rate is not known yet."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Meter:
    """Counts done out of `total` and says so at most every `every` seconds.

    The first update is not timed: it includes compiling, which would make
    the rate and the ETA wrong for the rest of the work.
    """

    def __init__(self, label: str, total: int, unit: str, every: float = 30.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.done = 0
        self._start: float | None = None
        self._timed_from = 0
        self._last = time.perf_counter()

    def update(self, done: int) -> None:
        """`done` so far (a running count, not an increment)."""
        now = time.perf_counter()
        if self._start is None:
            self._start, self._timed_from, self._last = now, done, now
        self.done = done
        if now - self._last >= self.every:
            self._last = now
            say(f"{self.label}: {self.done}/{self.total} {self.unit} | {self.status(now)}")

    def status(self, now: float | None = None) -> str:
        """`3.10 images/s | ETA 0m12s`, from the updates after the first."""
        now = time.perf_counter() if now is None else now
        elapsed = now - (self._start if self._start is not None else now)
        rate = (self.done - self._timed_from) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        return f"{rate:.2f} {self.unit}/s | ETA {format_eta(left)}"
