"""The one exception type for mistakes a user can make (bad file, bad flag, bad value).

The CLI turns it into one line on stderr and exit code 2; everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A user's mistake: the message names the field and the value."""


class WorkersFailed(RuntimeError):
    """Worker processes of a study died before its quota was met (killed, out of memory, a
    bug: their own output says which). Not a user's mistake: exit code 1, one line."""
