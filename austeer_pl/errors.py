"""User-facing errors.

Every problem a user can cause (bad names, bad files, mismatched states) raises
:class:`AusteerError` with a one-line message that names the problem and what to do.
The command-line entry points print that line and exit with status 2.
"""

from __future__ import annotations


class AusteerError(Exception):
    """A problem with the user's input, with a one-line message naming the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
