"""The one exception type the CLI turns into a one-line error."""


class SvdServeError(Exception):
    """A user-facing error: bad input, mismatched base, unsupported module.

    The CLI prints ``error: <message>`` and exits with status 2, without a traceback.
    """
