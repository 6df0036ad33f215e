"""The one exception type the data package raises for bad data, paths or settings."""


class DataError(ValueError):
    """A dataset problem with a one-line, human-readable message.

    Subclasses ValueError so callers that only expect ValueError (for example
    "corpus yields no train records") still catch it.
    """
