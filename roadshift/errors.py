"""The one base class of the errors a user can cause and fix: bad input, missing or corrupt
data, a failed data check, an unreachable store, a missing model.

The command line shows such an error as one short message (what failed, the file, key or
server at fault, what to do) and exits 2, without a traceback; ``--verbose`` shows it.
Anything else is a bug and keeps its traceback. Raise a subclass, with a message that
stands on its own, wherever a user's input or environment is at fault.
"""

from __future__ import annotations


class RoadshiftError(Exception):
    """An expected failure whose message is the whole story for the user."""
