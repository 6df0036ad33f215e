"""User-facing errors: one line naming the config key and the fix, exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, credentials). Printed as one line, exit 2."""

    def __init__(self, key: str, problem: str, fix: str = ""):
        self.key, self.problem, self.fix = key, problem, fix
        msg = f"{key}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none): what a one-line error shows."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

