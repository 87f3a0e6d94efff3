"""The one exception type kolm raises for problems the user can fix."""


class KolmError(Exception):
    """A user-facing error: the message says what is wrong and what to do.

    The command line prints it without a traceback and exits with ``exit_code`` (2: bad input or
    configuration; 1: a check that found problems, as `kolm shard verify` does)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
