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


class SettingError(AusteerError):
    """A setting with a bad value. The message names the setting (``k``, ``max_length``); a command
    line maps it to its own flag (``--model.k``, ``--data.max_length``) with :meth:`with_flag`.

    Example:
        >>> SettingError("k", "value 0 must be a positive whole number").with_flag("--model.k")
        '--model.k value 0 must be a positive whole number'
    """

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = " ".join(problem.split())
        super().__init__(f"setting '{setting}' {self.problem}")

    def with_flag(self, flag: str) -> str:
        return f"{flag} {self.problem}"
