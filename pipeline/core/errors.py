"""The one error type stages turn into a one-line message and a non-zero exit."""


class PipelineError(Exception):
    """A user-facing failure: bad config, bad input data, a missing earlier stage. The message says what and where."""
