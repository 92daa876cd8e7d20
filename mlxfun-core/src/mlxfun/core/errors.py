class MlxfunError(Exception):
    """A user-facing problem: the message names the problem and the fix, in one line.

    The CLI prints it as ``error: <message>`` and exits with status 1, without a traceback.
    """
