"""The one exception type for errors a user can cause (bad input, bad config, existing output).

Library code raises :class:`SimclrPathError` with a message that names the input, says what is
wrong and how to fix it. Only :mod:`simclr_path.cli` turns it into one stderr line and a non-zero
exit code; programming errors keep raising normally so they stay debuggable.
"""

from __future__ import annotations


class SimclrPathError(Exception):
    """A user-facing error: one line naming the input, the problem and the fix."""

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def check_int(value: object, caller: str, name: str, minimum: int = 0) -> int:
    """``value`` as an int, or one clear error: Python callers pass what YAML and argparse
    never would (a float, a string, a bool), which failed deep inside numpy or OpenCV."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise SimclrPathError(f"{caller}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(value: object, caller: str, name: str) -> float:
    """``value`` as a finite float > 0, or one clear error (see :func:`check_int`)."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value > 0):
        raise SimclrPathError(f"{caller}: {name} must be a finite number > 0, got {value!r}")
    return float(value)
