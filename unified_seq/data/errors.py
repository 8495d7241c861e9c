"""The one exception type for bad input data."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: a one-line message naming the file, the field and the fix."""

    def __init__(self, path: str, problem: str, fix: str = ""):
        self.path = path
        self.problem = problem
        self.fix = fix
        message = f"{path}: {problem}"
        if fix:
            message += f" ({fix})"
        # One line: what a person running the command reads first (and often only).
        super().__init__(" ".join(message.splitlines()))
