"""The errors a run reports to its user in one line (main.py prints them, no traceback).

Each names what is wrong and what to do; they are raised where the fault is
found, before anything is lost or half-written. Data problems are
`unified_seq.data.errors.DataError`.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config field the run cannot honour (named as `config.a.b`)."""


class WorkdirError(RuntimeError):
    """The workdir cannot be used: read-only, or held by another live run."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved, or none of the saved ones can be restored."""


class NonFiniteError(FloatingPointError):
    """The loss or the parameters became NaN/inf; nothing non-finite was saved."""


class Preempted(Exception):  # noqa: N818 (not an error: a clean, resumable stop)
    """SIGTERM arrived; the state was saved at `step` and the run stopped."""

    def __init__(self, step: int, directory: str):
        super().__init__(
            f"stopped by SIGTERM at step {step}: checkpoint saved in {directory}; "
            "run the same command again to resume"
        )
        self.step = step
