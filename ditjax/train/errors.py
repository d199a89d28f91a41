"""Errors the training CLI turns into clear messages and exit codes."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/Inf; the state was not updated and the last checkpoint is kept."""
