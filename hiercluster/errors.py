"""The one exception type for a user's mistake.

Anything the user can fix (a wrong path, a bad config value, a checkpoint for another
model) raises :class:`HierclusterError` with a message that names the thing that is
wrong and what would be right. The CLI prints that message alone and exits with 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class HierclusterError(ValueError):
    """A problem with the user's input, reported as one clear message."""
