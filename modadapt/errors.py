"""The one exception type users see: a clear message that names the fix."""


class ModAdaptError(ValueError):
    """Bad input or an unsupported situation; the message says what to do instead.

    The CLI prints it as one line and exits with a non-zero code; library users can catch it.
    """
