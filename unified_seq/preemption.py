"""SIGTERM (preemption, `kill`, a scheduler's stop) → save at the next step boundary, then stop.

One process: a signal handler raises a flag that the train loop reads after
each step. Many processes: every process must save at the same step, so
JAX's preemption sync point (the coordination service relays the notice to
all processes and agrees on a step) decides instead.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from absl import logging


class PreemptionWatch:
    """`reached(step)` is True once a SIGTERM has arrived (on any process)."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous: Any = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        del signum, frame
        if not self._flag.is_set():
            logging.warning("SIGTERM received: saving a checkpoint after this step")
        self._flag.set()

    def reached(self, step: int) -> bool:
        if not self._multi:
            return self._flag.is_set()
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # no preemption service in this cluster: never
            self._multi = False
            return False

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
