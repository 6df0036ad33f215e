"""The first line of an error: what every one-line message (the trainer's logs, the launcher's `error:` lines) shows."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name if it has none), at most `limit` characters."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
