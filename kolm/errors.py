"""The one exception type kolm raises for problems the user can fix."""


class KolmError(Exception):
    """A user-facing error: the message says what is wrong and what to do.

    The command line prints it without a traceback and exits with status 2.
    """
