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
