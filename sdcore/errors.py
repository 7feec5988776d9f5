"""The exception types that the command line turns into a single clear line and an exit status."""


class SdcoreError(Exception):
    """A user-facing error: unreadable or unknown checkpoint, unsupported option, a model that failed.

    The message is a complete sentence that says what is wrong and, where it can, what to do.
    The CLI prints it on one line and exits with `exit_code` (1).
    """

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)


class UsageError(SdcoreError):
    """A bad argument from the caller (out-of-range number, unknown name, wrong size): exit status 2."""

    exit_code = 2
