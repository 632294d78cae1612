"""The one error type for expected failures: bad paths, bad data, bad options.

The CLI prints its message on one line and exits non-zero; the API renders it as JSON.
The message must tell the user what to do.
"""


class RetrievalError(Exception):
    """An expected failure whose message tells the user what to do."""
