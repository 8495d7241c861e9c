"""The one exception type for bad input data."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message names the file, the field and the fix."""

    def __init__(self, path: str, problem: str, fix: str = ""):
        self.path = path
        self.problem = problem
        self.fix = fix
        message = f"{path}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)
