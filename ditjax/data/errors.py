"""The one error every dataset kind raises when its data is not on disk: callers catch one type."""


class DatasetMissingError(FileNotFoundError):
    """The configured dataset is not on disk in a readable form; the message says how to fix it."""
