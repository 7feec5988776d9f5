"""The one exception type that the command line turns into a single clear line and exit status."""


class SdcoreError(Exception):
    """A user-facing error: bad input, unknown checkpoint, unsupported option.

    The message is a complete sentence that says what is wrong and, where it can, what to do.
    The CLI prints it on one line and exits with `exit_code` (2 for bad arguments, 1 otherwise).
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
