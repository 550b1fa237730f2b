"""The one exception type for user mistakes.

Raise :class:`UserError` for anything the user can fix (a wrong path, a bad value, a missing
file). ``run.py`` prints its message on one line, without a traceback, and exits with status 2;
``HYDRA_FULL_ERROR=1`` shows the traceback as well. Messages name the cause and the fix.
"""


class UserError(Exception):
    """A problem with the user's input, configuration or files, with the fix in its message."""
